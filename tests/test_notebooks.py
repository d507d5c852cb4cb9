"""notebooks/*.ipynb run top to bottom with nbclient on CPU with the tiny models (CI=1), in a temporary directory.

The kernel is this interpreter: a kernelspec written into a temporary folder whose argv is `sys.executable -m
ipykernel_launcher` (the "python3" spec a venv installs says plain `python`, which is whatever PATH finds). A failing
cell fails the test (nbclient raises CellExecutionError). Both notebooks reuse the session's tiny models
(RLT_ASSETS_DIR), so neither builds them again. After the run, the files the notebooks wrote are checked against
the notebook's own claims: the quickstart's run has its 6 steps and plots, and the reward notebook's table holds the
rewards `rlt_rewards` gives its explanations when they are scored again here in a different batch.
"""
import json
import os
import sys

import nbformat
import numpy as np
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from conftest import REPO, tiny_module_config

NOTEBOOKS = REPO / "notebooks"
KERNEL = "rlt-jax-test-python"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
  kernels = tmp_path_factory.mktemp("kernels")
  write_kernel_spec(kernels / KERNEL)
  with open(kernels / KERNEL / "kernel.json") as f:
    assert json.load(f)["argv"][0] == sys.executable
  return kernels


def kernel_env(assets) -> dict:
  env = dict(os.environ, CI="1", JAX_PLATFORMS="cpu", RLT_ASSETS_DIR=os.path.dirname(assets["teacher"]),
             PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  # One CPU device, as a user's runtime has (conftest gives this process 8 fake ones).
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env.pop("RLT_MODEL", None)
  env.pop("RLT_WORKDIR", None)
  return env


def run_notebook(name, cwd, env, kernel_dir):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
  NotebookClient(nb, km=km, timeout=600, startup_timeout=120,
                 resources={"metadata": {"path": str(cwd)}}).execute(cleanup_kc=True, env=env)
  return nb


def outputs(nb, mime):
  return [o["data"][mime] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
          if mime in o.get("data", {})]


@pytest.mark.parametrize("name", ["quickstart.ipynb", "reward_api.ipynb"])
def test_committed_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name}: a cell was committed with outputs"


def test_quickstart(assets, kernel_dir, tmp_path):
  nb = run_notebook("quickstart.ipynb", tmp_path, kernel_env(assets), kernel_dir)
  workdir = tmp_path / "rlt_runs" / "quickstart"
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r["reward_mean"]) for r in rows)
  assert {p.name for p in (workdir / "plots").iterdir()} == {"reward.png", "match_rate.png", "kl_to_ref.png",
                                                              "lengths.png", "throughput.png", "optimizer.png"}
  assert len(outputs(nb, "image/png")) >= 2  # the inline curves and the throughput PNG
  (spans,) = [h for h in outputs(nb, "text/html") if "<pre" in h]
  assert "background:#b7e4c7" in spans and "background:#ffd8a8" in spans  # explanation and solution tokens
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "step   6  reward" in text and "every component rlt_reward returns" in text
  # The last section: the exported teacher explains 8 items, a student is distilled on them and graded.
  distilled = [json.loads(line) for line in open(workdir / "distill" / "distill.jsonl")]
  skipped = [json.loads(line) for line in open(workdir / "distill" / "skipped.jsonl")]
  assert sorted(r["index"] for r in distilled + skipped) == list(range(8))
  results = json.loads((workdir / "eval" / "results.json").read_text())
  assert results["model_path"] == str(workdir / "student_sft" / "export")
  assert results["benchmarks"]["gsm8k"]["n_problems"] == 8
  assert any("| gsm8k |" in o.get("text/markdown", "") for c in nb.cells if c.cell_type == "code"
             for o in c.outputs for o in [o.get("data", {})])
  assert not any(p.name.startswith("rlt_runs") for p in NOTEBOOKS.iterdir())  # nothing landed in the repo


def test_reward_api(assets, kernel_dir, tmp_path):
  from rlt_jax import data, formats, hf_checkpoint, rewards
  run_notebook("reward_api.ipynb", tmp_path, kernel_env(assets), kernel_dir)
  workdir = tmp_path / "rlt_runs" / "reward_api"
  rows = [json.loads(line) for line in open(workdir / "explanations.jsonl")]
  scores = [json.loads(line) for line in open(workdir / "scores.jsonl")]
  assert len(rows) == len(scores) == 12
  assert [(r["question"][:40] + "…", r["candidate"]) for r in rows] == [(s["question"], s["candidate"])
                                                                        for s in scores]
  for q in range(3):  # ranks are 1..4 within a question, 1 = the highest reward
    group = scores[4 * q:4 * q + 4]
    for name in ("log-ratio (paper)", "k3", "no teacher entropy", "r_SS only"):
      order = sorted(range(4), key=lambda i: -group[i][name])
      assert [group[i][f"rank: {name}"] for i in order] == [1, 2, 3, 4], (q, name)

  # The first question's four candidates scored again here, alone in their batch and padded to another length.
  tok = hf_checkpoint.load_tokenizer(assets["tokenizer"])
  tiny_format = tiny_module_config().format  # the notebook must use configs/tiny.py's system prompts too
  fmt = formats.RLTFormat(tok, teacher_system=tiny_format.teacher_system, student_system=tiny_format.student_system)
  tc, tp = hf_checkpoint.load_hf(assets["teacher"])
  sc, sp = hf_checkpoint.load_hf(assets["student"])
  batch = rows[:4]
  qs, sols = [r["question"] for r in batch], [r["solution"] for r in batch]
  prompts = fmt.teacher_prompts(qs, sols)
  comps = [fmt.completion_ids(r["explanation"]) for r in batch]
  exs = fmt.student_examples(qs, sols, comps, prompt_lens=[len(p) for p in prompts])
  teacher = data.pad_right([dict(input_ids=np.concatenate([p, c]), explanation_mask=e.teacher_explanation_mask)
                            for p, c, e in zip(prompts, comps, exs)], (768,), fmt.pad_id)
  student = data.collate_students(exs, (768,), fmt.pad_id)
  reward, metrics, _ = rewards.rlt_rewards(tc, tp, sc, sp, rewards.RewardBatch(
      teacher["input_ids"], teacher["attention_mask"], teacher["explanation_mask"], student["input_ids"],
      student["attention_mask"], student["explanation_mask"], student["solution_mask"], student["matched"]),
      rewards.RewardConfig())
  np.testing.assert_allclose([s["log-ratio (paper)"] for s in scores[:4]], reward, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose([s["no teacher entropy"] for s in scores[:4]], metrics["reward_no_entropy"],
                             rtol=1e-4, atol=1e-4)
