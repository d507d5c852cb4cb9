"""The paper's whole path on tiny local models, each stage reading the previous one's output by path:
teacher SFT warm-up → RL (2 steps) → distillation data (8 items, k = 2) → student SFT → graded evaluation; each
model carries the prompt it was trained with (rlt_format.json) to the next stage."""
import json
import logging

import jax
import numpy as np

from conftest import set_fields, tiny_module_config
from rlt_jax import distill, evaluate, hf_checkpoint, model_format, sft, tiny, train


def _models_differ(a, b):
  pa, pb = hf_checkpoint.load_hf(a)[1], hf_checkpoint.load_hf(b)[1]
  return any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(pa),
                                                                             jax.tree.leaves(pb)))


DISTILLED_PROMPT = "Think it through, then answer."


def test_sft_rl_distill_student_sft_evaluate(assets, tmp_path, shared_data, caplog):
  systems = {"format.teacher_system": tiny.TEACHER_SYSTEM, "format.student_system": tiny.STUDENT_SYSTEM}
  common = dict(systems, tensorboard=False, num_devices=2)
  # 1. Teacher warm-up on the teacher format (the bundled GSM8K sample: explanation = the worked solution).
  warm = tmp_path / "teacher_sft"
  sft.run(set_fields(sft.default_config(), dict(
      common, kind="teacher", model_path=assets["teacher"], max_len=1024, batch_size=2, steps=3,
      learning_rate=1e-3, logprob_chunk_size=256)), str(warm))
  assert _models_differ(assets["teacher"], warm / "export")
  assert model_format.read(str(warm / "export"))["teacher_system"] == tiny.TEACHER_SYSTEM
  # 2. RL from the warmed-up teacher (its export holds the tokenizer too). No prompt in the config: the teacher's
  # and the student's recorded ones are used, and the export records the teacher's.
  rl = tmp_path / "rl"
  train.run(set_fields(tiny_module_config(), dict(
      tensorboard=False, num_devices=2, tiny_models=False, teacher_path=str(warm / "export"),
      student_path=assets["student"], batch_size=8, group_size=4, max_new_tokens=16, steps=2, export_dir="export",
      **{"format.teacher_system": "", "format.student_system": ""})), str(rl))
  assert _models_differ(warm / "export", rl / "export")
  assert model_format.read(str(rl / "export"))["teacher_system"] == tiny.TEACHER_SYSTEM
  # 3. The RL teacher explains 8 items, two candidates each; the distilled rows carry a prompt of their own.
  dist = tmp_path / "distill"
  counts = distill.run(set_fields(distill.default_config(), dict(
      teacher_path=str(rl / "export"), student_path=assets["student"], max_prompt_len=384,
      max_new_tokens=24, max_student_len=448, logprob_chunk_size=128, **{
          "format.student_system": DISTILLED_PROMPT, "distill.candidates": 2, "distill.items_per_batch": 4,
          "distill.limit": 8})), str(dist))
  assert counts["rows"] + counts["skipped"] == 8 and counts["rows"] >= 4
  rows = [json.loads(line) for line in open(dist / "distill.jsonl")]
  assert all(r["candidates"] == 2 and len(r["candidate_rewards"]) == 2 for r in rows)
  assert {r["system"] for r in rows} == {DISTILLED_PROMPT}
  # 4. A student distilled on exactly those rows (one epoch over the datasets folder); it trains on the rows' own
  # prompt (not the config's) and records it.
  student = tmp_path / "student_sft"
  last = sft.run(set_fields(sft.default_config(), dict(
      common, kind="student", model_path=assets["student"], max_len=1024, batch_size=2, epochs=1, steps=0,
      learning_rate=1e-3, logprob_chunk_size=256, **{"data.path": str(dist / "dataset")})), str(student))
  assert last["rows_used"] == counts["rows"] and last["rows_skipped"] == 0
  assert model_format.read(str(student / "export"))["student_system"] == DISTILLED_PROMPT
  # 5. Graded evaluation of the distilled student on 8 GSM8K test problems, under the prompt it was distilled with
  # (no prompt in the config).
  ev = tmp_path / "eval"
  evaluate.run(set_fields(evaluate.default_config(), dict(
      model_path=str(student / "export"), benchmarks=(f"gsm8k={shared_data / 'gsm8k' / 'test.jsonl'}",),
      limit=8, max_new_tokens=24, max_prompt_len=384, batch_size=8)), str(ev))
  results = json.loads((ev / "results.json").read_text())
  per_problem = [json.loads(line) for line in open(ev / "gsm8k.jsonl")]
  assert len(per_problem) == 8 and results["model_path"] == str(student / "export")
  assert results["student_system"] == DISTILLED_PROMPT
  gsm = results["benchmarks"]["gsm8k"]
  assert gsm["n_problems"] == 8 and gsm["pass@1"] == np.mean([p["pass_rate"] for p in per_problem])
  # An explicit prompt is honoured, with a warning naming both.
  caplog.clear()
  with caplog.at_level(logging.WARNING, "rlt_jax"):
    evaluate.run(set_fields(evaluate.default_config(), dict(
        model_path=str(student / "export"), benchmarks=("gsm8k=sample",), limit=2, max_new_tokens=4,
        max_prompt_len=384, batch_size=2, **{"format.student_system": tiny.STUDENT_SYSTEM})), str(tmp_path / "ev2"))
  assert json.loads((tmp_path / "ev2" / "results.json").read_text())["student_system"] == tiny.STUDENT_SYSTEM
  (warning,) = [r.getMessage() for r in caplog.records if "overrides the prompt" in r.getMessage()]
  assert repr(DISTILLED_PROMPT) in warning and repr(tiny.STUDENT_SYSTEM) in warning
