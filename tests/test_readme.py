"""The README's reward snippet runs as printed (it is the reward API's documentation)."""
import re

import numpy as np

from conftest import REPO


def test_reward_snippet_runs():
  readme = (REPO / "README.md").read_text()
  section = readme[readme.index("## The reward on its own"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  printed = []
  scope = {"print": lambda *a: printed.append(a)}
  exec(compile(code, "README.md (reward snippet)", "exec"), scope)  # noqa: S102
  reward, metrics = scope["reward"], scope["metrics"]
  assert np.asarray(reward).shape == (1,) and np.isfinite(np.asarray(reward)).all()
  # r = r_SS − r_KL (matched, so no penalty): the snippet's numbers obey the README's formula.
  np.testing.assert_allclose(np.asarray(reward), np.asarray(metrics["r_ss"]) - np.asarray(metrics["r_kl"]), atol=1e-5)
  assert printed
