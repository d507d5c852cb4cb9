"""The TRL side of bench/train_step.py: the same RLT teacher RL step, run by trl's GRPOTrainer in PyTorch.

Runs in its own virtualenv (torch + trl + transformers, no JAX, no rlt_jax), started by bench/train_step.py:

  python3 -m venv /work/trl-venv && /work/trl-venv/bin/pip install torch==2.13.0 trl==1.16.0 transformers==5.24.0
  /work/trl-venv/bin/python bench/trl_peer.py --spec SPEC.json

SPEC.json (written by train_step.py): model/tokenizer dirs, rows {prompt, question, solution}, the format strings,
the batch/G/length/optimizer settings and the timing windows. Protocol: lines starting with "@@peer " on stdout are
JSON records ({"ready"}, one {"step"} per timed step, {"done"}); the peer runs `warmup` untimed steps, then waits for
one line on stdin before each window of `window` steps (so the two sides never run at the same time).

The reward is the RLT reward (METHOD_SPEC §2.2) run the way the official code runs it: per completion, at batch 1,
the frozen student on the student chat (question + explanation as thought + reference solution) and the current
policy on the teacher sequence, both at T=0.7, full-vocabulary log_softmax, masked mean/min/max and a `.item()` per
logged component:  R = mean ℓ_s + 0.01 min ℓ_s − 3 mean d − 0.03 max d − 1[no end tag],  d = ℓ_t − ℓ_s.
Spans are built by construction (the pieces are tokenized separately and concatenated), so no sub-sequence search.
"""
import argparse
import json
import shutil
import sys
import tempfile
import time


def emit(**record):
  print("@@peer " + json.dumps(record), flush=True)


def token_logprobs(model, ids, temperature):
  """ℓ[j] = log softmax(logits[j] / T)[ids[j + 1]] for one sequence [L] -> [L − 1]."""
  import torch
  logits = model(input_ids=ids[None]).logits[0, :-1].float()
  return torch.gather(torch.log_softmax(logits / temperature, -1), -1, ids[1:, None])[:, 0]


class RLTReward:
  """The RLT reward as a TRL reward function; `teacher` is set to the trainer's (current) model after construction."""

  def __init__(self, spec, tokenizer, student):
    self.__name__ = "rlt_reward"
    self.spec, self.tok, self.student, self.teacher = spec, tokenizer, student, None
    self.seconds, self.lengths, self.rewards, self.generate_seconds = 0.0, [], [], 0.0

  def _enc(self, text):
    return self.tok(text, add_special_tokens=False)["input_ids"]

  def _sequences(self, prompt, question, solution, completion):
    """(teacher ids, teacher explanation span, student ids, student explanation span, solution span, matched)."""
    f = self.spec["format"]
    end_tag = f["explanation_tags"][1]
    cut = completion.find(end_tag)
    matched = cut >= 0
    explanation = completion[:cut] if matched else completion  # unmatched: scored on the partial text, as the paper
    e_ids = self._enc(explanation)
    t_pre = self._enc(prompt)
    t_ids = t_pre + e_ids + self._enc(end_tag + "<|im_end|>")
    s_head = self._enc(f"<|im_start|>system\n{f['student_system']}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                       f"<|im_start|>assistant\n{f['think_prefix']}{f['thought_tags'][0]}{f['padding']}")
    s_mid = self._enc(f"{f['thought_tags'][1]}{f['delimiter']}{f['student_solution_tags'][0]}")
    s_sol = self._enc(solution)
    s_ids = s_head + e_ids + s_mid + s_sol + self._enc(f"{f['student_solution_tags'][1]}<|im_end|>\n")
    t_span = (len(t_pre), len(t_pre) + len(e_ids))
    s_span = (len(s_head), len(s_head) + len(e_ids))
    lo = s_span[1] + len(s_mid)
    return t_ids, t_span, s_ids, s_span, (lo, lo + len(s_sol)), matched

  def __call__(self, prompts, completions, completion_ids, question, solution, **kwargs):
    import torch
    t0 = time.perf_counter()
    T = self.spec["temperature"]
    out = []
    with torch.no_grad():
      for p, c, q, s in zip(prompts, completions, question, solution):
        t_ids, (t0_, t1_), s_ids, (s0_, s1_), (a, b), matched = self._sequences(p, q, s, c)
        ls = token_logprobs(self.student, torch.tensor(s_ids), T)
        lt = token_logprobs(self.teacher, torch.tensor(t_ids), T)
        sol = ls[a - 1:b - 1]  # entry j scores token j + 1
        d = lt[t0_ - 1:t1_ - 1] - ls[s0_ - 1:s1_ - 1]
        # Undefined reductions over an empty span take the paper's fills (−1 for ℓ_s terms, +1 for the KL terms).
        lp = [sol.mean().item(), sol.min().item()] if sol.numel() else [-1.0, -1.0]
        kl = [d.mean().item(), d.max().item()] if d.numel() else [1.0, 1.0]
        r = lp[0] + 0.01 * lp[1] - (3.0 * kl[0] + 0.03 * kl[1]) + (0.0 if matched else -1.0)
        out.append(r)
    self.lengths.extend(len(ids) for ids in completion_ids)
    self.rewards.extend(out)
    self.seconds += time.perf_counter() - t0
    return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--spec", required=True)
  args = ap.parse_args()
  with open(args.spec) as f:
    spec = json.load(f)

  import torch
  import transformers
  import trl
  from datasets import Dataset
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(spec["seed"])
  tok = transformers.AutoTokenizer.from_pretrained(spec["tokenizer"])
  student = transformers.AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32).eval()
  reward = RLTReward(spec, tok, student)
  B, G, W = spec["batch_size"], spec["group_size"], spec["window"]
  total = spec["warmup"] + spec["windows"] * W
  g = spec["grpo"]
  config = trl.GRPOConfig(
      output_dir=tempfile.mkdtemp(prefix="rlt_trl_peer_"), per_device_train_batch_size=B,
      gradient_accumulation_steps=1, num_generations=G, max_completion_length=spec["max_new_tokens"],
      temperature=spec["temperature"], top_p=1.0, top_k=0, beta=g["beta"], epsilon=g["clip_eps"],
      num_iterations=1, loss_type="grpo", scale_rewards="group", learning_rate=g["learning_rate"],
      lr_scheduler_type="constant", warmup_steps=0, weight_decay=g["weight_decay"], adam_beta1=g["b1"],
      adam_beta2=g["b2"], adam_epsilon=g["adam_eps"], max_grad_norm=g["max_grad_norm"], max_steps=total,
      sync_ref_model=g["ref_sync_steps"] > 0, ref_model_sync_steps=max(g["ref_sync_steps"], 1),
      ref_model_mixup_alpha=g["ref_mixup_alpha"], bf16=False, fp16=False, use_cpu=True,
      gradient_checkpointing=False, model_init_kwargs={"dtype": "float32"}, use_vllm=False, report_to="none",
      logging_steps=10 ** 6, save_strategy="no", disable_tqdm=True, seed=spec["seed"], dataloader_num_workers=0,
      log_completions=False)
  dataset = Dataset.from_list(spec["rows"])

  class Windows(transformers.TrainerCallback):
    """Times every step (end of the previous step, or the resume after a wait, to this step's end) and waits on
    stdin before each timed window."""

    def __init__(self):
      self.t = None

    def on_train_begin(self, *a, **k):
      self.t = time.perf_counter()

    def on_step_end(self, a, state, control, **k):
      now, step = time.perf_counter(), state.global_step
      if step > spec["warmup"]:
        emit(step=step, seconds=now - self.t, reward_seconds=reward.seconds, sample_seconds=reward.generate_seconds,
             len_mean=sum(reward.lengths) / max(len(reward.lengths), 1),
             reward_mean=sum(reward.rewards) / max(len(reward.rewards), 1))
      reward.seconds, reward.lengths, reward.rewards, reward.generate_seconds = 0.0, [], [], 0.0
      if step < total and (step - spec["warmup"]) % W == 0:
        emit(ready=step)
        if not sys.stdin.readline():
          control.should_training_stop = True
      self.t = time.perf_counter()

  trainer = trl.GRPOTrainer(model=spec["teacher"], reward_funcs=[reward], args=config, train_dataset=dataset,
                            processing_class=tok, callbacks=[Windows()])
  reward.teacher = trainer.model  # the reward scores with the current policy (METHOD_SPEC §2.2)
  generate = trainer.model.generate  # timed for the per-phase breakdown (TRL generates with this very module)

  def timed_generate(*a, **k):
    t0 = time.perf_counter()
    out = generate(*a, **k)
    reward.generate_seconds += time.perf_counter() - t0
    return out

  trainer.model.generate = timed_generate
  trainer.train()
  shutil.rmtree(config.output_dir, ignore_errors=True)
  emit(done=True, torch=torch.__version__, trl=trl.__version__, transformers=transformers.__version__,
       threads=torch.get_num_threads())


if __name__ == "__main__":
  main()
