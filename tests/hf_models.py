"""Tiny random transformers models (the PyTorch oracle), saved locally, and NumPy log-probs from logits. No network."""
import numpy as np
import torch
import transformers


def make_hf_model(path, *, arch="qwen2", vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, inter=96,
                  tie=False, rope_theta=10000.0, bias=True, seed=0, std=0.08):
  """Builds, perturbs (so biases and norm scales are non-trivial) and saves a tiny causal LM; returns it."""
  torch.manual_seed(seed)
  common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                rope_theta=rope_theta, max_position_embeddings=256, rms_norm_eps=1e-6)
  if arch == "qwen2":
    cfg = transformers.Qwen2Config(**common)
    model = transformers.Qwen2ForCausalLM(cfg)
  else:
    cfg = transformers.LlamaConfig(attention_bias=bias, **common)
    model = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(std * torch.randn_like(p))
  model.eval()
  model.save_pretrained(path)
  return model


def hf_logits(model, ids, mask):
  """transformers logits with positions from the mask (as generate computes them)."""
  ids, mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
  pos = (mask.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float().numpy()


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_token_logprobs(logits_BTV, ids_BT, temperature):
  ls = np_log_softmax(np.asarray(logits_BTV, np.float64) / temperature)
  picked = np.take_along_axis(ls[:, :-1], np.asarray(ids_BT)[:, 1:, None], -1)[..., 0]
  return np.concatenate([np.zeros((ids_BT.shape[0], 1)), picked], 1)
