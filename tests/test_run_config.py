"""The validators' one helper: errors name the field as the user types it (`config.data.path='x': ...`)."""
import pytest

from rlt_jax import grpo, run_config


def test_checker_names_the_field_as_typed():
  cfg = run_config.default_config()
  c = run_config.Checker(cfg)
  assert c.value("data.path") == "" and c.value("grpo.beta") == 0.04 and c.value("no.such") is None
  c.need(True, "steps", "is never reported")
  with pytest.raises(run_config.ConfigError, match=r"^config\.data\.path='': must be set$"):
    c.need(False, "data.path", "must be set")
  with pytest.raises(run_config.ConfigError, match=r"^config\.steps=125: must be >= 1000$"):
    c.need(cfg.steps >= 1000, "steps", "must be >= 1000")
  assert c.call("grpo", grpo.GRPOConfig, micro_batches=2).micro_batches == 2
  with pytest.raises(run_config.ConfigError, match=r"^config\.grpo: GRPOConfig\.micro_batches=0: must be >= 1$"):
    c.call("grpo", grpo.GRPOConfig, micro_batches=0)
  with pytest.raises(run_config.ConfigError, match=r"^config\.mesh: "):
    c.call("mesh", lambda: int("x"))


def test_validate_names_the_fields_a_step_cannot_honour():
  cfg = run_config.default_config()
  cfg.tiny_models = True
  run_config.validate(cfg)  # the defaults pass
  cfg.grpo.num_iterations = 2
  with pytest.raises(run_config.ConfigError, match=r"^config\.grpo\.num_iterations=2: must be 1"):
    run_config.validate(cfg)
  cfg.grpo.num_iterations, cfg.reward.teacher_temperature = 1, 1.0
  with pytest.raises(run_config.ConfigError, match=r"^config\.reward\.teacher_temperature=1\.0: must equal"):
    run_config.validate(cfg)


def test_profile_steps_window():
  cfg = run_config.default_config()
  cfg.tiny_models = True
  assert run_config.profile_window(cfg) is None  # "" = no trace
  for text, window in (("3,5", (3, 5)), (" 2, 2 ", (2, 2))):
    cfg.profile_steps = text
    assert run_config.profile_window(cfg) == window
  cfg.profile_steps = "5-7"
  with pytest.raises(run_config.ConfigError, match=r"^config\.profile_steps='5-7': expected 'START,END'"):
    run_config.validate(cfg)  # the RL run checks it before any work
  assert "profile_steps" in run_config.RESUME_SAFE_FIELDS  # tracing a resumed run's steps changes nothing it computes


def test_eval_fields_checked_and_only_eval_every_resume_safe():
  cfg = run_config.default_config()
  cfg.tiny_models = True
  assert cfg.eval_every == 0 and cfg.eval.num_prompts == 0 and cfg.eval.path == ""  # off: every row trains
  cfg.eval_every = 10
  with pytest.raises(run_config.ConfigError, match=r"^config\.eval\.num_prompts=0: must be >= 1 with "
                                                   r"config\.eval_every=10"):
    run_config.validate(cfg)
  cfg.eval.num_prompts, cfg.eval.path = 4, "/no/such.jsonl"
  with pytest.raises(run_config.ConfigError, match=r"^config\.eval\.path='/no/such\.jsonl': cannot be read"):
    run_config.validate(cfg)
  cfg.eval.path = ""
  run_config.validate(cfg)
  saved = run_config.config_json(cfg)
  cfg.eval_every, cfg.eval.num_prompts = 5, 8  # how often is free; which rows are held out changes the training data
  changed, _ = run_config.config_changes(saved, cfg)
  assert changed == [("eval.num_prompts", 4, 8)]
