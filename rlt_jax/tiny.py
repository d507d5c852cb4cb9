"""Tiny local models and tokenizer, built on the spot, for CPU runs, tests and notebooks (no network, no weights).

The tokenizer is a byte-level BPE with ChatML special tokens, like Qwen2.5's but with a few hundred ids, trained on
the texts it is given (by default the bundled GSM8K sample and the RLT tags), so tiny models have a small vocabulary
and still speak the same formats as a real Qwen2.5 teacher.

`ensure_assets` also gives the random models a short warm-up on the sample in the RLT formats (the paper's teacher
starts from an SFT'd model and its student knows the thought/solution format): a random teacher never writes the
explanation's end tag and a random student ignores the explanation, so RL on them would have no signal to follow.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlt_jax import data, formats, hf_checkpoint, model_format
from rlt_jax.models import init_params, logprobs
from rlt_jax.models.config import ModelConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Short system prompts for the tiny CPU runs (configs/*tiny*.py): they keep a tiny model's sequences short; the
# formats stay those of the paper.
TEACHER_SYSTEM = ("Give the solution between <|begin_of_solution|> and <|end_of_solution|>, then explain it between "
                  "<|begin_of_explanation|> and <|end_of_explanation|>.")
STUDENT_SYSTEM = ("Think between <|begin_of_thought|> and <|end_of_thought|>, then give the solution between "
                  "<|begin_of_solution|> and <|end_of_solution|>.")
RLT_TAG_TEXT = ("<|begin_of_solution|> <|end_of_solution|> <|begin_of_explanation|> <|end_of_explanation|> "
                "<|begin_of_thought|> <|end_of_thought|> <think> </think>\n\n")


def build_tokenizer(path: str | os.PathLike, texts: Iterable[str], vocab_size: int = 512):
  """Trains a byte-level BPE on `texts` and saves it as a transformers tokenizer directory; returns the tokenizer."""
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(list(texts) + [RLT_TAG_TEXT] * 50, trainer=trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
      additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False)
  fast.chat_template = CHATML_TEMPLATE
  fast.save_pretrained(os.fspath(path))
  return hf_checkpoint.load_tokenizer(path)


def tiny_config(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, tie: bool = True, eos_token_id=None) -> ModelConfig:
  return ModelConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, rope_theta=10000.0,
                     tie_word_embeddings=tie, max_position_embeddings=4096, eos_token_id=eos_token_id)


def warmup_rows(fmt: formats.RLTFormat, rows: list[dict]) -> list[formats.SFTExample]:
  """Teacher and student SFT rows whose explanation is the first line of the worked solution (short, so a tiny
  teacher learns to close the explanation within a few dozen tokens)."""
  out = []
  for r in rows:
    explanation = "\n\n" + r["solution"].strip().split("\n")[0] + "\n\n"
    out.append(fmt.teacher_sft_example(r["question"], r["solution"], explanation))
    out.append(fmt.student_sft_example(r["question"], explanation, r["solution"]))
  return out


def warmup(config: ModelConfig, params, examples: list[formats.SFTExample], *, steps: int = 100,
           batch_size: int = 16, learning_rate: float = 3e-3, seed: int = 0):
  """Next-token training on the loss-masked SFT rows (Adam; batches padded to a few length buckets)."""
  longest = max(len(e.input_ids) for e in examples)
  buckets = sorted({min(b, longest) for b in (128, 256, 384, 512, 768, 1024, 1536, 2048)} | {longest})
  rows = [dict(input_ids=e.input_ids, loss_mask=e.loss_mask) for e in examples]
  opt = optax.adam(learning_rate)

  @jax.jit
  def step(params, opt_state, ids, mask, loss_mask):
    def loss_fn(p):
      lp = logprobs.token_logprobs(config, p, ids, mask, chunk_size=256)
      return -jnp.sum(lp * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = opt.init(params)
  rng = np.random.RandomState(seed)
  for _ in range(steps):
    b = data.pad_right([rows[i] for i in rng.randint(0, len(rows), batch_size)], buckets, 0)
    params, opt_state, loss = step(params, opt_state, b["input_ids"], b["attention_mask"],
                                   b["loss_mask"].astype(np.float32))
  return params, float(loss)


def ensure_assets(directory: str | os.PathLike, rows: list[dict], *, vocab_size: int = 1024, seed: int = 0,
                  warmup_steps: int = 100, format_overrides: dict | None = None, **shape) -> dict[str, str]:
  """Tokenizer, teacher and student under `directory`, built once (reused when a previous run left them there).

  `rows` are canonical rows ({question, solution}); both models start from one random init warmed up on them.
  """
  directory = os.fspath(directory)
  paths = {k: os.path.join(directory, k) for k in ("tokenizer", "teacher", "student")}
  done = os.path.join(directory, "assets.json")
  if os.path.exists(done):
    return paths
  tok = build_tokenizer(paths["tokenizer"], [r["question"] + "\n" + r["solution"] for r in rows], vocab_size)
  config = tiny_config(len(tok), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), **shape)
  params = init_params(config, jax.random.key(seed))
  loss = None
  fmt = formats.RLTFormat(tok, **(format_overrides or {}))
  if warmup_steps:
    params, loss = warmup(config, params, warmup_rows(fmt, rows), steps=warmup_steps, seed=seed)
  for name in ("teacher", "student"):
    hf_checkpoint.save_hf(config, params, paths[name], tokenizer=tok)
    model_format.write(paths[name], fmt, name)  # both warmed up in this format (`warmup_rows`)
  with open(done + ".tmp", "w") as f:
    json.dump({"vocab_size": len(tok), "warmup_steps": warmup_steps, "warmup_loss": loss, **shape}, f)
  os.replace(done + ".tmp", done)  # written last: a run killed mid-build rebuilds everything
  return paths
