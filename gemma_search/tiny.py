"""A tiny Gemma 2: the 9B's structure at toy size, saved like a real checkpoint.

Tests and the demo load it through the same `from_pretrained` path that loads
`google/gemma-2-9b` (design decision 10): no model hub is needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["SPECIAL_TOKENS", "make_tiny_model"]

#: Gemma's own ids for its special tokens: pad 0, eos 1, bos 2, unk 3.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")


def make_tiny_model(out_dir: str | Path, texts: Iterable[str], *, vocab_size: int = 512,
                    hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                    initializer_range: float = 0.2) -> Path:
    """Train a BPE tokenizer on `texts`, build a random tiny Gemma 2, save both to `out_dir`.

    The config keeps what makes Gemma 2 Gemma 2: grouped-query attention, alternating
    sliding-window and global layers, attention soft-cap 50, final-logit soft-cap 30,
    GeGLU MLP, tied embeddings.

    `initializer_range` is larger than Gemma's 0.02: the frozen, tied embedding is also the
    output layer, and at 0.02 a random 64-wide model cannot make any token likely, so LoRA
    alone could not lower a causal LM loss the way it does on a pretrained checkpoint.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 1. tokenizer: byte-level BPE, so any text (and any later dataset) is encodable
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>",
                                        eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(out)

    # 2. model: Gemma 2 at toy size
    heads, kv_heads = 4, 2
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        query_pre_attn_scalar=hidden_size // heads,
        max_position_embeddings=1024,
        sliding_window=64,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(config)
    model.save_pretrained(out)
    return out
