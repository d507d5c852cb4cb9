"""rlt_jax.rewards against independent oracles (`models.logprobs` has its own tests: tests/test_logprobs.py).

- `rlt_reward`: a per-row NumPy reference written from METHOD_SPEC §2.2 (NaN for undefined reductions, then the fills).
- `rlt_rewards`: tiny random transformers (PyTorch) teacher and student models as the log-prob oracle, then the same
  NumPy reference with spans cut out row by row with boolean indexing; 8 fake devices give the 1-device result.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlt_jax import hf_checkpoint, rewards, sharding
from rlt_jax.rewards import RewardConfig


# --------------------------------------------------------------------------------------------- NumPy references
def np_reduce(x, op):
  """One reduction over a 1-D span; NaN where undefined (empty span), as the official per-sample code gives."""
  if op == "sum":
    return float(np.sum(x))
  if x.size == 0:
    return float("nan")
  return float({"mean": np.mean, "min": np.min, "max": np.max}[op](x))


def np_rlt_reward(sol_lp, sol_mask, t_lp, s_lp, expl_mask, matched, cfg: RewardConfig):
  """METHOD_SPEC §2.2, one row at a time in float64. Returns {metric: [B]}."""
  pen = cfg.not_matched_penalty
  clip = lambda x: np.clip(np.asarray(x, np.float64), -1e5, 1e5)  # noqa: E731  the official clip bounds
  out = {k: [] for k in ("reward", "r_ss", "r_kl", "r_kl_no_entropy", "match_reward", "reward_no_entropy")}
  for b in range(len(matched)):
    s = clip(np.asarray(sol_lp[b])[np.asarray(sol_mask[b], bool)])
    lt = clip(np.asarray(t_lp[b])[np.asarray(expl_mask[b], bool)])
    ls = clip(np.asarray(s_lp[b])[np.asarray(expl_mask[b], bool)])
    d = lt - ls
    if cfg.kl_estimator == "k3":
      with np.errstate(over="ignore", invalid="ignore"):
        d = d - 1 + np.exp(-d)
    d = clip(d)
    fill = lambda v, f: f if np.isnan(v) else v  # noqa: E731
    lp = [fill(np_reduce(s, op), pen) for op in cfg.answer_log_prob_reductions]
    kl = [fill(np_reduce(d, op), -pen) for op in cfg.kl_penalty_reductions]
    kl_ne = [fill(np_reduce(-ls, op), -pen) for op in cfg.kl_penalty_reductions]
    r_ss = sum(c * v for c, v in zip(cfg.answer_log_prob_coeff, lp))
    r_kl = sum(c * v for c, v in zip(cfg.kl_penalty_coeff, kl))
    r_kl_ne = sum(c * v for c, v in zip(cfg.kl_penalty_coeff, kl_ne))
    match = 0.0 if matched[b] else pen
    for op, v in zip(cfg.answer_log_prob_reductions, lp):
      out.setdefault(f"solution_logp_{op}", []).append(v)
    for op, v, w in zip(cfg.kl_penalty_reductions, kl, kl_ne):
      out.setdefault(f"kl_{op}", []).append(v)
      out.setdefault(f"no_entropy_kl_{op}", []).append(w)
    with_ent, no_ent = r_ss - r_kl + match, r_ss - r_kl_ne + match
    for k, v in (("r_ss", r_ss), ("r_kl", r_kl), ("r_kl_no_entropy", r_kl_ne), ("match_reward", match),
                 ("reward_no_entropy", no_ent), ("reward", with_ent if cfg.include_teacher_entropy else no_ent)):
      out[k].append(v)
  return {k: np.asarray(v) for k, v in out.items()}


def assert_metrics_match(reward, metrics, ref):
  np.testing.assert_allclose(np.asarray(reward), ref["reward"], rtol=1e-6, atol=1e-5)
  for k, v in ref.items():
    got = np.asarray(metrics[k] if k != "reward" else reward)
    assert np.isfinite(got).all(), k
    np.testing.assert_allclose(got, v, rtol=1e-6, atol=1e-5, err_msg=k)


# ------------------------------------------------------------------------------------------------- rlt_reward
def test_bad_reward_configs_give_clear_errors():
  with pytest.raises(ValueError, match="answer_log_prob_coeff"):
    RewardConfig(answer_log_prob_coeff=(1.0,))
  with pytest.raises(ValueError, match="kl_penalty_reductions.*median"):
    RewardConfig(kl_penalty_reductions=("mean", "median"))
  with pytest.raises(ValueError, match="kl_estimator"):
    RewardConfig(kl_estimator="k2")
  with pytest.raises(ValueError, match="student_temperature"):
    RewardConfig(student_temperature=-1)
  assert RewardConfig(kl_penalty_coeff=[3.0, 0.03]) == RewardConfig()  # lists from YAML are accepted and hashable


def _edge_case_batch():
  rng = np.random.RandomState(3)
  B, S, N = 8, 12, 10
  sol_lp = -rng.exponential(2.0, (B, S)).astype(np.float32)
  t_lp = -rng.exponential(1.0, (B, N)).astype(np.float32)
  s_lp = -rng.exponential(1.5, (B, N)).astype(np.float32)
  sol_mask = rng.rand(B, S) < 0.6
  expl_mask = np.arange(N)[None] < rng.randint(1, N + 1, (B, 1))
  matched = np.ones(B, bool)
  sol_mask[1] = False                 # empty solution span
  expl_mask[2] = False                # empty explanation (e.g. whitespace only)
  sol_mask[3] = expl_mask[3] = False  # an all-padding row
  matched[3] = matched[4] = False     # missing end tags
  sol_mask[4], expl_mask[4] = np.eye(S, dtype=bool)[5], np.eye(N, dtype=bool)[0]  # one-token spans
  # Garbage at masked positions must not leak; a NaN inside a span makes the reduction undefined (-> fill);
  # a -inf log-prob inside a span is clipped at -1e5 (finite); k3 with d << 0 overflows exp (clipped too).
  sol_lp[0, ~sol_mask[0]] = np.nan
  t_lp[0, ~expl_mask[0]], s_lp[0, ~expl_mask[0]] = -np.inf, np.nan
  sol_lp[5, np.flatnonzero(sol_mask[5])[0]] = np.nan
  s_lp[6, 0], expl_mask[6, 0] = np.nan, True
  sol_mask[7, 2], sol_lp[7, 2] = True, -np.inf
  t_lp[7, 0], s_lp[7, 0], expl_mask[7, 0] = -150.0, -0.1, True
  return sol_lp, sol_mask, t_lp, s_lp, expl_mask, matched


@pytest.mark.parametrize("cfg", [
    RewardConfig(),
    RewardConfig(kl_estimator="k3"),
    RewardConfig(include_teacher_entropy=False, not_matched_penalty=-2.0,
                 answer_log_prob_coeff=(1.0, 0.5, 0.1), answer_log_prob_reductions=("mean", "max", "sum")),
], ids=["default", "k3", "no_entropy_custom"])
def test_rlt_reward_matches_numpy_reference(cfg):
  batch = _edge_case_batch()
  reward, metrics = jax.jit(rewards.rlt_reward, static_argnames="config")(*batch, config=cfg)
  ref = np_rlt_reward(*batch, cfg)
  assert_metrics_match(reward, metrics, ref)
  assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values())
  if cfg == RewardConfig():
    # spec values: the empty explanation gets KL mean = max = +1 (r_KL = 3.03); the empty solution LP = -1
    assert metrics["kl_mean"][2] == metrics["kl_max"][2] == 1.0
    np.testing.assert_allclose(metrics["r_kl"][2], 3.03, rtol=1e-6)
    np.testing.assert_allclose(metrics["r_ss"][1], -1.01, rtol=1e-6)
    np.testing.assert_allclose(reward[3], -1.01 - 3.03 - 1.0, rtol=1e-6)

  def total(*x):
    return rewards.rlt_reward(*x, batch[4], batch[5], cfg)[0].sum()

  # The reward is not a loss: its inputs are stop-gradient'd, and the (zero) gradients carry no NaN.
  grads = jax.grad(total, argnums=(0, 2, 3))(jnp.asarray(batch[0]), batch[1], jnp.asarray(batch[2]),
                                               jnp.asarray(batch[3]))
  assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_left_align_is_a_stable_gather():
  vals = np.arange(24, dtype=np.float32).reshape(3, 8)
  mask = np.array([[0, 1, 0, 1, 1, 0, 0, 0], [0] * 8, [1] * 8], bool)
  got, valid = rewards.left_align(vals, mask, 5)
  np.testing.assert_array_equal(np.asarray(valid), [[1, 1, 1, 0, 0], [0] * 5, [1] * 5])
  np.testing.assert_array_equal(np.asarray(got), [[1, 3, 4, 0, 0], [0] * 5, [16, 17, 18, 19, 20]])


# ------------------------------------------------------------------------------------- rlt_rewards end to end
@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  from hf_models import make_hf_model
  root = tmp_path_factory.mktemp("reward_models")
  models = {}
  for name, seed in (("teacher", 1), ("student", 2)):
    hf = make_hf_model(root / name, vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, seed=seed, std=0.15)
    config, params = hf_checkpoint.load_hf(root / name)
    models[name] = (hf, config, params)
  return models


def _examples(B, seed):
  """Teacher = prompt + explanation + end tag; student = prefix + the same explanation + tags + solution.

  Row 1 is left-padded, row 2 has an empty explanation, row 3 an empty solution and no end tag, the last row is all
  padding; the rest are random lengths, right-padded.
  """
  rng = np.random.RandomState(seed)
  Tt, Ts = 40, 48
  a = {k: np.zeros((B, T), np.int32) for k, T in (("teacher_ids", Tt), ("teacher_attention_mask", Tt),
                                                    ("teacher_explanation_mask", Tt), ("student_ids", Ts),
                                                    ("student_attention_mask", Ts),
                                                    ("student_explanation_mask", Ts), ("solution_mask", Ts))}
  matched = np.ones(B, bool)
  for b in range(B - 1):
    n_expl = 0 if b == 2 else rng.randint(1, 15)
    n_sol = 0 if b == 3 else rng.randint(1, 8)
    expl = rng.randint(0, 128, n_expl)
    t_seq = [rng.randint(0, 128, rng.randint(3, 12)), expl, rng.randint(0, 128, 2)]
    s_seq = [rng.randint(0, 128, rng.randint(3, 10)), expl, rng.randint(0, 128, 3), rng.randint(0, 128, n_sol),
             rng.randint(0, 128, 2)]
    for side, seq, span in (("teacher", t_seq, {1: "teacher_explanation_mask"}),
                            ("student", s_seq, {1: "student_explanation_mask", 3: "solution_mask"})):
      ids = np.concatenate(seq)
      T = a[f"{side}_ids"].shape[1]
      start = T - len(ids) if b == 1 else 0  # left padding on row 1
      a[f"{side}_ids"][b, start:start + len(ids)] = ids
      a[f"{side}_attention_mask"][b, start:start + len(ids)] = 1
      pos = start
      for i, part in enumerate(seq):
        if i in span:
          a[span[i]][b, pos:pos + len(part)] = 1
        pos += len(part)
  matched[3] = matched[B - 1] = False
  return a, matched


def _reference(hf_pair, a, matched, cfg):
  from hf_models import hf_logits, np_token_logprobs
  lt = np_token_logprobs(hf_logits(hf_pair["teacher"][0], a["teacher_ids"], a["teacher_attention_mask"]),
                         a["teacher_ids"], cfg.teacher_temperature)
  ls = np_token_logprobs(hf_logits(hf_pair["student"][0], a["student_ids"], a["student_attention_mask"]),
                         a["student_ids"], cfg.student_temperature)
  B = len(matched)
  # Spans cut row by row with boolean indexing, then padded to a common width: an independent alignment.
  t_rows = [lt[b][a["teacher_explanation_mask"][b] == 1] for b in range(B)]
  s_rows = [ls[b][a["student_explanation_mask"][b] == 1] for b in range(B)]
  N = max(1, max(len(r) for r in t_rows))
  pad = lambda rows: np.stack([np.pad(r, (0, N - len(r))) for r in rows])  # noqa: E731
  expl_mask = np.stack([np.arange(N) < len(r) for r in t_rows])
  return lt, np_rlt_reward(ls, a["solution_mask"], pad(t_rows), pad(s_rows), expl_mask, matched, cfg)


def _call(hf_pair, a, matched, cfg, **kw):
  (_, tc, tp), (_, sc, sp) = hf_pair["teacher"], hf_pair["student"]
  return rewards.rlt_rewards(tc, tp, sc, sp, rewards.RewardBatch(
      a["teacher_ids"], a["teacher_attention_mask"], a["teacher_explanation_mask"], a["student_ids"],
      a["student_attention_mask"], a["student_explanation_mask"], a["solution_mask"], matched), cfg, **kw)


def test_rlt_rewards_end_to_end_matches_transformers(hf_pair):
  cfg = RewardConfig()
  a, matched = _examples(6, seed=0)
  reward, metrics, teacher_logp = _call(hf_pair, a, matched, cfg, chunk_size=16)
  lt_ref, ref = _reference(hf_pair, a, matched, cfg)
  assert_metrics_match(reward, metrics, ref)
  assert not np.asarray(metrics["explanation_length_mismatch"]).any()
  # teacher log-probs (GRPO's old_logp) wherever a token and its predecessor are real
  att = a["teacher_attention_mask"] == 1
  scored = att & np.pad(att[:, :-1], ((0, 0), (1, 0)))
  np.testing.assert_allclose(np.asarray(teacher_logp)[scored], lt_ref[scored], atol=1e-5, rtol=0)
  assert np.ptp(ref["reward"][:2]) > 0.01 and np.isfinite(np.asarray(reward)).all()


def test_rlt_rewards_rejects_misaligned_spans(hf_pair):
  a, matched = _examples(6, seed=0)
  cfg = RewardConfig()
  bad = {k: v.copy() for k, v in a.items()}
  bad["student_explanation_mask"][0, np.flatnonzero(bad["student_explanation_mask"][0])[-1]] = 0
  with pytest.raises(ValueError, match="row 0: teacher_expl marks"):
    _call(hf_pair, bad, matched, cfg)
  bad = {k: v.copy() for k, v in a.items()}
  bad["student_ids"][0, np.flatnonzero(bad["student_explanation_mask"][0])[0]] += 1
  with pytest.raises(ValueError, match="row 0: explanation token 0"):
    _call(hf_pair, bad, matched, cfg)
  bad = {k: v.copy() for k, v in a.items()}
  bad["solution_mask"][0, -1] = 1
  with pytest.raises(ValueError, match=r"solution_mask\[0, 47\].*padding"):
    _call(hf_pair, bad, matched, cfg)
  with pytest.raises(ValueError, match="matched"):
    _call(hf_pair, a, matched[:-1], cfg)


@pytest.mark.parametrize("mesh_shape,micro_batch", [((8, 1, 1), 0), ((2, 2, 2), 0), ((2, 2, 2), 4)])
def test_rlt_rewards_sharded_equals_single_device(hf_pair, mesh_shape, micro_batch):
  """Also in parts of 4 rows (micro_batch): the same rewards, the batch still split over (data, fsdp)."""
  # The paper's reward (log-ratio KL). k3's e^(-d) magnifies float32 rounding of d by up to e^|d| on random models.
  cfg = RewardConfig()
  a, matched = _examples(8, seed=1)
  want = jax.tree.map(np.asarray, _call(hf_pair, a, matched, cfg, chunk_size=16))
  mesh = sharding.make_mesh(mesh_shape)
  (_, tc, tp), (_, sc, sp) = hf_pair["teacher"], hf_pair["student"]
  with sharding.use_mesh(mesh):
    tp, sp = hf_checkpoint.shard_params(tp, mesh, tc), hf_checkpoint.shard_params(sp, mesh, sc)
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))  # noqa: E731
    args = [put(a[k]) for k in ("teacher_ids", "teacher_attention_mask", "teacher_explanation_mask", "student_ids",
                                "student_attention_mask", "student_explanation_mask", "solution_mask")]
    got = rewards.rlt_rewards(tc, tp, sc, sp, rewards.RewardBatch(*args, put(matched)), cfg, chunk_size=16,
                              micro_batch=micro_batch)
  assert got[0].sharding.spec == sharding.batch_sharding(mesh, 1).spec  # the batch stays split over (data, fsdp)
  for k, w in jax.tree_util.tree_leaves_with_path(want):
    g = got
    for p in k:
      g = g[p.idx if hasattr(p, "idx") else p.key]
    np.testing.assert_allclose(np.asarray(g), w, atol=1e-5, rtol=1e-6, err_msg=str(k))


def test_micro_batched_rewards_equal_one_call_and_transformers(hf_pair):
  cfg = RewardConfig()
  a, matched = _examples(8, seed=2)
  _, ref = _reference(hf_pair, a, matched, cfg)
  whole = _call(hf_pair, a, matched, cfg, chunk_size=16)
  parts = _call(hf_pair, a, matched, cfg, chunk_size=16, micro_batch=2)  # rows {0,4}, {1,5}, ... scored together
  assert_metrics_match(parts[0], parts[1], ref)
  for x, y in zip(jax.tree.leaves(parts), jax.tree.leaves(whole)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match="micro_batch=3 does not divide the batch of 8"):
    _call(hf_pair, a, matched, cfg, micro_batch=3)


def test_teacher_last_scores_only_the_completion_columns_and_changes_no_reward(hf_pair):
  """The RL step's teacher_last = N: the explanations lie in the last N columns, only those go through the
  teacher's vocabulary projection, and the rewards, metrics and those columns' log-probs are the full call's (and
  transformers')."""
  cfg = RewardConfig()
  a, matched = _examples(6, seed=3)
  T = a["teacher_ids"].shape[1]
  N = T - int(np.flatnonzero(a["teacher_explanation_mask"].any(0))[0])  # from the first explanation column on
  lt_ref, ref = _reference(hf_pair, a, matched, cfg)
  full = _call(hf_pair, a, matched, cfg, chunk_size=16)
  last = _call(hf_pair, a, matched, cfg, chunk_size=16, teacher_last=N)
  assert_metrics_match(last[0], last[1], ref)
  np.testing.assert_allclose(np.asarray(last[0]), np.asarray(full[0]), atol=1e-6, rtol=0)
  assert last[2].shape == (6, N)
  att = a["teacher_attention_mask"] == 1
  scored = (att & np.pad(att[:, :-1], ((0, 0), (1, 0))))[:, -N:]  # a real token with a real one before it
  np.testing.assert_allclose(np.asarray(last[2])[scored], lt_ref[:, -N:][scored], atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match=rf"teacher_expl\[\d+, \d+\] is set, but teacher_last={N - 1} scores only"):
    _call(hf_pair, a, matched, cfg, teacher_last=N - 1)
  with pytest.raises(ValueError, match=rf"teacher_last={T} must be in \[1, {T - 1}\]"):
    _call(hf_pair, a, matched, cfg, teacher_last=T)
