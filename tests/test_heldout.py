"""The held-out prompts on their own (no model): a seeded pick that the training stream never yields, a file of their
own, batches of the step's shape and means that leave the filling rows out."""
import numpy as np
import pytest

from rlt_jax import data, heldout, run_config


def eval_cfg(**fields):
  cfg = run_config.default_config()
  cfg.max_prompt_len, cfg.seed = 4096, 3
  cfg.eval.update(fields)
  return cfg


def test_set_aside_rows_are_a_seeded_pick_the_stream_never_yields(fmt):
  cfg = eval_cfg(num_prompts=5)
  held = heldout.select(cfg, fmt, train_used=300)
  assert len(held.rows) == 5 and len(held.exclude) == 5 and list(held.exclude) == sorted(held.exclude)
  again = heldout.select(cfg, fmt, train_used=300)  # every process picks the same rows
  assert again.exclude == held.exclude and [r["where"] for r in again.rows] == [r["where"] for r in held.rows]
  assert held.exclude != (0, 1, 2, 3, 4)  # not the file's head
  lines = [int(r["where"].rsplit(":", 1)[1]) for r in held.rows]
  assert sorted(i + 1 for i in held.exclude) == sorted(lines)  # indices of the rows they are (lines from 1)
  ds = data.make_dataset([data.SAMPLE_PATH], fmt, batch_size=5, buckets=(4096,), num_epochs=1, shuffle=False,
                         drop_remainder=False, exclude=held.exclude)
  streamed = [w for b in ds for w in b["where"]]
  assert len(streamed) == 295 and not set(streamed) & {r["where"] for r in held.rows}
  assert heldout.select(eval_cfg(num_prompts=0), fmt, train_used=300) is None


def test_a_file_of_their_own_sets_nothing_aside_and_too_few_rows_name_the_field(fmt, tmp_path):
  path = tmp_path / "held.jsonl"
  path.write_text("".join(open(data.SAMPLE_PATH).readlines()[:3]))
  held = heldout.select(eval_cfg(path=str(path), num_prompts=3), fmt, train_used=300)
  assert held.exclude == () and sorted(r["where"] for r in held.rows) == [f"{path}:{i}" for i in (1, 2, 3)]
  with pytest.raises(run_config.ConfigError, match=r"^config\.eval\.num_prompts=4: .* has only 3 usable prompts"):
    heldout.select(eval_cfg(path=str(path), num_prompts=4), fmt, train_used=300)
  with pytest.raises(run_config.ConfigError, match=r"^config\.eval\.num_prompts=5: sets aside 5 of the 5 usable"):
    heldout.select(eval_cfg(num_prompts=5), fmt, train_used=5)


def test_batches_have_the_step_shape_and_the_means_leave_the_filling_out(fmt):
  held = heldout.select(eval_cfg(num_prompts=5), fmt, train_used=300)
  parts = heldout.batches(held, 2, 4096, fmt.pad_id)
  assert [n for _, n in parts] == [2, 2, 1]
  assert all(b["prompt_ids"].shape == (2, 4096) for b, _ in parts)
  last = parts[-1][0]
  assert last["where"] == [held.rows[4]["where"]] * 2
  np.testing.assert_array_equal(last["prompt_ids"][0], last["prompt_ids"][1])
  G = 2  # two completions a prompt; the last batch's second prompt (rows 2, 3) is filling
  reward = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0, 6.0, 7.0, 8.0]), np.array([9.0, 10.0, 99.0, 99.0])]
  got = heldout.summary([dict(prompts=n, reward=r, r_ss=r / 2, r_kl=-r, matched=r > 4.5, lengths=r * 0 + 3)
                         for (_, n), r in zip(parts, reward)], G)
  assert got == {"eval/reward_mean": 5.5, "eval/r_ss_mean": 2.75, "eval/r_kl_mean": -5.5, "eval/match_rate": 0.6,
                 "eval/completion_len_mean": 3.0}
  assert set(got) == set(heldout.KEYS)
