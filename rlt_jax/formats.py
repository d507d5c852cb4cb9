"""RLT chat formats: teacher prompts, id-level student examples and SFT rows (the dataset row readers are `rows`).

Teacher turn (METHOD_SPEC §1.4): ChatML system + user, then the assistant turn
  `<|begin_of_solution|>{solution}<|end_of_solution|>\n\n<|begin_of_explanation|>\n\n{explanation}
  <|end_of_explanation|>`.
The RL prompt stops after the open explanation tag and its padding; the teacher writes the explanation, the end tag
and <|im_end|>.
Student turn (§1.5): `<|begin_of_thought|>\n\n{explanation}<|end_of_thought|>\n\n<|begin_of_solution|>{solution}
<|end_of_solution|>`. The student never sees the solution before the thought.

Why the student sequence is spliced from the sampled ids (§7 item 2): the official code decodes the teacher's ids to
text, re-tokenizes and searches for the explanation with heuristics, so the reward and the loss can see different
tokens. Here `student_example` builds
  [ids of the student chat up to and including the open thought tag + padding] + [sampled explanation ids]
  + [ids of: residual text + end-thought tag + delimiter + solution tags and content + <|im_end|>\n]
and every mask is known by construction. Both prompts end with the same token (`>\n\n`, id 1339 for Qwen2.5), so the
explanation ids sit after the same left context in both sequences.

End of the explanation: the completion is cut at its first eos id (<|im_end|> or <|endoftext|>). The end tag is searched
in the bytes of the sampled ids (a per-id byte table: one `bytes.find`, no decode-and-regex, no O(n·m) scans). This
finds the tag whatever ids spell it, including a BPE merge of the last explanation character with the tag's `<`
(`.<`, id 15757). Rules:
  - explanation ids = the sampled ids that lie entirely before the tag. A last id that straddles the tag (`.<`) is
    not an explanation id (§8); its explanation bytes (the residual, here ".") stay in the text: they are
    re-tokenized with the end-thought tag, so the student text keeps the full explanation. If a split would fall
    inside a UTF-8 character, the split moves back to the character start.
  - no end tag (cut by max_new_tokens, or eos first): `matched=False`, every id before eos is explanation.
  - an explanation of zero ids gives all-False masks. A whitespace-only explanation is NOT empty: its ids were sampled
    after the prompt's `>\n\n` token and are scored like any other explanation ids.
  - `explanation_text` = bytes of the explanation ids + residual, decoded (UTF-8, invalid bytes replaced like the
    tokenizer does), and `tokenizer.decode(input_ids) == fmt.student_text(question, explanation_text, solution)`.
Solution mask: the suffix ids whose bytes lie inside the solution content (tags excluded); an id that BPE merged with
a tag (`>\n\n` when the content starts with "\n\n", `.<` at its end) is left out of the mask.

Only byte-level BPE tokenizers with ChatML special tokens (Qwen2/2.5) are supported; the constructor checks it. The
ChatML text is rendered here (tests check it against the tokenizer's own chat template); the system block is
tokenized once per distinct system prompt, which is exact because special tokens split the pre-tokenization.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlt_jax import rows

# ------------------------------------------------------------------------------------------------------------ styles
_STRATOS_TEACHER = (
    "You are a teacher who writes explanations for students. For each question you receive, first state the "
    "precise and accurate solution, then explain in detail the reasoning that leads to it, the way a careful "
    "student would think it through: read the question, try approaches, check each step, notice and fix "
    "mistakes, and summarise. Write two sections. The solution goes between {sol0} and {sol1}. The "
    "explanation goes between {exp0} and {exp1}, with its steps separated by blank lines (\"\\n\\n\"). "
    "Answer the question below following these rules.")
_STRATOS_STUDENT = (
    "You are an assistant that thinks carefully before answering. Work through the question with a long, "
    "systematic chain of reasoning: analyse it, explore ideas, check and revise each step, and only then give "
    "the final answer. Write two sections. The thinking goes between {th0} and {th1}, with its steps "
    "separated by blank lines (\"\\n\\n\"). The final, precise solution goes between {sol0} and {sol1}. "
    "Solve the question below following these rules.")
_R1_STUDENT = (
    "You are an assistant that thinks carefully before answering. Reason step by step between {th0} and {th1}, "
    "then give the final answer.")

STYLES: dict[str, dict[str, Any]] = {
    "stratos": dict(solution_tags=rows.STRATOS_TAGS["solution"],
                    explanation_tags=("<|begin_of_explanation|>", "<|end_of_explanation|>"),
                    thought_tags=rows.STRATOS_TAGS["thought"],
                    student_solution_tags=rows.STRATOS_TAGS["solution"],
                    teacher_system=_STRATOS_TEACHER, student_system=_STRATOS_STUDENT,
                    delimiter="\n\n", padding="\n\n", think_prefix=""),
    "r1": dict(solution_tags=("<solution>", "</solution>"),
               explanation_tags=("<explanation>", "</explanation>"),
               thought_tags=("<think>", "</think>"),
               student_solution_tags=("", ""),
               teacher_system=_STRATOS_TEACHER, student_system=_R1_STUDENT,
               delimiter="\n\n", padding="\n", think_prefix=""),
}
_FIELDS = tuple(STYLES["stratos"])
EOS_TEXT = "<|im_end|>"


def _byte_decoder() -> dict[str, int]:
  """Inverse of the GPT-2 byte-to-unicode map used by byte-level BPE vocabularies."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


def token_byte_table(tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(flat uint8 bytes, start[V+1], length[V+1]) of every token id; index V is an empty entry for ids out of range."""
  dec = _byte_decoder()
  added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
  toks = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
  pieces = []
  for i, t in enumerate(toks):
    if i in added:
      pieces.append(added[i].encode("utf-8"))
    elif t is None:
      pieces.append(b"")
    else:
      try:
        pieces.append(bytes(dec[c] for c in t))
      except KeyError as e:
        raise ValueError(f"formats: token {i} ({t!r}) is not byte-level BPE; RLTFormat needs a byte-level BPE "
                         "tokenizer such as Qwen2/2.5") from e
  pieces.append(b"")
  length = np.array([len(p) for p in pieces], np.int64)
  start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
  return np.frombuffer(b"".join(pieces), np.uint8), start, length


@dataclasses.dataclass(frozen=True)
class StudentExample:
  """One student sequence spliced from a teacher completion. Masks are bool, aligned with the id arrays."""
  input_ids: np.ndarray                 # int32 [S]: student chat
  explanation_mask: np.ndarray          # [S]: the sampled explanation ids
  solution_mask: np.ndarray             # [S]: solution content ids (tags excluded)
  teacher_explanation_mask: np.ndarray  # [P + C]: the same ids inside teacher prompt + completion
  matched: bool                         # the explanation's end tag was generated
  explanation_text: str                 # the explanation as it appears in the student text
  explanation_start: int                # first explanation position in input_ids
  explanation_len: int                  # number of explanation ids (0 = empty)


@dataclasses.dataclass(frozen=True)
class SFTExample:
  input_ids: np.ndarray  # int32 [S]
  loss_mask: np.ndarray  # bool [S]: positions whose token is trained on


class RLTFormat:
  """Tags, system prompts and paddings of the teacher/student chats, bound to one tokenizer.

  `RLTFormat(tok)` is the Stratos style, `RLTFormat(tok, style="r1")` the R1 style; any field of STYLES can be
  overridden by keyword (e.g. `teacher_system=...`, `padding="\n"`). Default system prompts mention the tags in use.
  """

  def __init__(self, tokenizer, style: str = "stratos", **overrides):
    if style not in STYLES:
      raise ValueError(f"formats: unknown style {style!r}; choose one of {sorted(STYLES)}")
    unknown = set(overrides) - set(_FIELDS)
    if unknown:
      raise ValueError(f"formats: unknown RLTFormat field(s) {sorted(unknown)}; fields are {_FIELDS}")
    spec = {**STYLES[style], **overrides}
    self.style = style
    for k, v in spec.items():
      setattr(self, k, tuple(v) if isinstance(v, list) else v)
    tags = dict(sol0=self.solution_tags[0], sol1=self.solution_tags[1], exp0=self.explanation_tags[0],
                exp1=self.explanation_tags[1], th0=self.thought_tags[0], th1=self.thought_tags[1])
    if "teacher_system" not in overrides:
      self.teacher_system = self.teacher_system.format(**tags)
    if "student_system" not in overrides:
      self.student_system = self.student_system.format(
          **{**tags, "sol0": self.student_solution_tags[0], "sol1": self.student_solution_tags[1]})
    if not self.explanation_tags[1]:
      raise ValueError("formats: the explanation end tag cannot be empty (it marks where the explanation stops)")
    self.tokenizer = tokenizer
    ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", EOS_TEXT, "<|endoftext|>"])
    if ids[0] is None or ids[0] == tokenizer.unk_token_id or ids[1] is None:
      raise ValueError("formats: the tokenizer has no ChatML tokens <|im_start|>/<|im_end|> (Qwen2/2.5 expected)")
    self.eos_id = int(ids[1])
    self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[2])
    self.stop_ids = np.array(sorted({self.eos_id, self.pad_id}), np.int64)
    self._bytes, self._start, self._len = token_byte_table(tokenizer)
    self._end_tag = self.explanation_tags[1].encode("utf-8")
    self._sys_cache: dict[str, np.ndarray] = {}
    probe = "Ünïcode 世界 x.<|end|>\n\n  ok"
    if self.token_bytes(self._encode([probe])[0]) != probe.encode():
      raise ValueError("formats: the tokenizer's ids do not concatenate to the text's bytes (byte-level BPE needed)")

  # ---------------------------------------------------------------------------------------------------------- text
  def chat_text(self, system: str, user: str, assistant: str | None = None, *, done: bool = True) -> str:
    """ChatML text; `done=False` leaves the assistant turn open (a prompt to continue)."""
    s = f"{self._sys_block(system)}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if assistant is None:
      return s
    return s + assistant + ("<|im_end|>\n" if done else "")

  def _teacher_assistant_prefix(self, solution: str) -> str:
    (s0, s1), e0 = self.solution_tags, self.explanation_tags[0]
    return f"{s0}{solution}{s1}{self.delimiter}{e0}{self.padding}"

  def teacher_prompt_text(self, question: str, solution: str) -> str:
    return self.chat_text(self.teacher_system, question, self._teacher_assistant_prefix(solution), done=False)

  def teacher_text(self, question: str, solution: str, explanation: str) -> str:
    asst = self._teacher_assistant_prefix(solution) + explanation + self.explanation_tags[1]
    return self.chat_text(self.teacher_system, question, asst)

  def _student_head(self) -> str:
    return self.think_prefix + self.thought_tags[0] + self.padding

  def _student_tail(self) -> tuple[str, str]:
    """(text between the explanation and the solution content, text after the content) in the student turn."""
    (s0, s1), t1 = self.student_solution_tags, self.thought_tags[1]
    return f"{t1}{self.delimiter}{s0}", s1

  def student_text(self, question: str, explanation: str, solution: str, system: str | None = None) -> str:
    before, after = self._student_tail()
    asst = self._student_head() + explanation + before + solution + after
    return self.chat_text(system or self.student_system, question, asst)

  def student_prompt_text(self, question: str, system: str | None = None) -> str:
    """What a trained student is asked at evaluation time: system + question + open assistant turn."""
    return self.chat_text(system or self.student_system, question)

  # ---------------------------------------------------------------------------------------------------------- ids
  def _encode(self, texts: Sequence[str]) -> list[np.ndarray]:
    out = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [np.asarray(x, np.int32) for x in out]

  @staticmethod
  def _sys_block(system: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n"

  def _system_ids(self, system: str) -> np.ndarray:
    if system not in self._sys_cache:
      self._sys_cache[system] = self._encode([self._sys_block(system)])[0]
    return self._sys_cache[system]

  def _chat_ids(self, systems: Sequence[str], rests: Sequence[str]) -> list[np.ndarray]:
    """ids of system block + rest (rest starts at <|im_start|>user), one batched tokenizer call."""
    return [np.concatenate([self._system_ids(s), r]) for s, r in zip(systems, self._encode(rests))]

  def token_bytes(self, ids) -> bytes:
    ids = np.asarray(ids, np.int64)
    return self._gather(ids)[0]

  def _gather(self, ids: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Bytes of ids, and the start and (exclusive) end byte offset of each id."""
    ids = np.where((ids >= 0) & (ids < len(self._len) - 1), ids, len(self._len) - 1)
    lens = self._len[ids]
    ends = np.cumsum(lens)
    idx = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(self._start[ids] - (ends - lens), lens)
    return self._bytes[idx].tobytes(), ends - lens, ends

  def teacher_prompts(self, questions: Sequence[str], solutions: Sequence[str]) -> list[np.ndarray]:
    rests = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{self._teacher_assistant_prefix(s)}"
             for q, s in zip(questions, solutions)]
    return self._chat_ids([self.teacher_system] * len(rests), rests)

  def teacher_prompt(self, question: str, solution: str) -> np.ndarray:
    """int32 ids of the RL prompt: ChatML system + user + open assistant turn ending after the explanation padding."""
    return self.teacher_prompts([question], [solution])[0]

  def completion_ids(self, explanation: str) -> np.ndarray:
    """What a perfect teacher samples: explanation + end tag + <|im_end|> (canonical tokenization)."""
    return self._encode([explanation + self.explanation_tags[1] + EOS_TEXT])[0]

  def split_completion(self, completion_ids) -> tuple[int, bool, bytes, bytes]:
    """(n explanation ids, end tag found, explanation bytes, residual bytes) of one completion (rules: module doc)."""
    ids = np.asarray(completion_ids)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(f"formats: completion_ids must be a 1-D integer array, got shape {ids.shape} {ids.dtype}")
    ids = ids.astype(np.int64)
    stop = np.flatnonzero(np.isin(ids, self.stop_ids))
    ids = ids[: stop[0]] if stop.size else ids
    raw, _, ends = self._gather(ids)
    pos = raw.find(self._end_tag)
    matched = pos >= 0
    if not matched:
      return len(ids), False, raw, b""
    n = int(np.searchsorted(ends, pos, side="right"))
    cut = int(ends[n - 1]) if n else 0
    while n and cut < pos and (raw[cut] & 0xC0) == 0x80:  # never split a UTF-8 character
      n -= 1
      cut = int(ends[n - 1]) if n else 0
    return n, True, raw[:cut], raw[cut:pos]

  def student_examples(self, questions: Sequence[str], solutions: Sequence[str], completions: Sequence[Any], *,
                       systems: Sequence[str | None] | None = None,
                       prompt_lens: Sequence[int] | None = None) -> list[StudentExample]:
    """Batched `student_example` (two or three tokenizer calls for the whole batch)."""
    n = len(questions)
    if not (len(solutions) == len(completions) == n):
      raise ValueError(f"formats: {n} questions, {len(solutions)} solutions, {len(completions)} completions")
    systems = [s or self.student_system for s in (systems or [None] * n)]
    if prompt_lens is None:
      prompt_lens = [len(p) for p in self.teacher_prompts(questions, solutions)]
    head = self._student_head()
    keys = [(s, q) for s, q in zip(systems, questions)]
    uniq = list(dict.fromkeys(keys))
    pre = dict(zip(uniq, self._chat_ids([s for s, _ in uniq],
                                        [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{head}"
                                         for _, q in uniq])))
    splits = [self.split_completion(c) for c in completions]
    suffixes, sol_bytes = [], []
    for (_, _, _, resid), sol in zip(splits, solutions):
      before, after = self._student_tail()
      r = resid.decode("utf-8", "replace")
      suffixes.append(f"{r}{before}{sol}{after}<|im_end|>\n")
      lo = len((r + before).encode())
      sol_bytes.append((lo, lo + len(sol.encode())))
    out = []
    for i, suf in enumerate(self._encode(suffixes)):
      p = pre[keys[i]]
      k, matched, ebytes, resid = splits[i]
      comp = np.asarray(completions[i]).astype(np.int32)
      _, starts, ends = self._gather(suf.astype(np.int64))
      lo, hi = sol_bytes[i]
      sol_mask = (starts >= lo) & (ends <= hi)
      s_len = len(p) + k + len(suf)
      e_mask = np.zeros(s_len, bool)
      e_mask[len(p): len(p) + k] = True
      t_mask = np.zeros(prompt_lens[i] + len(comp), bool)
      t_mask[prompt_lens[i]: prompt_lens[i] + k] = True
      out.append(StudentExample(
          input_ids=np.concatenate([p, comp[:k], suf]).astype(np.int32), explanation_mask=e_mask,
          solution_mask=np.concatenate([np.zeros(len(p) + k, bool), sol_mask]), teacher_explanation_mask=t_mask,
          matched=bool(matched), explanation_start=len(p), explanation_len=k,
          explanation_text=ebytes.decode("utf-8", "replace") + resid.decode("utf-8", "replace")))
    return out

  def student_example(self, question: str, solution: str, completion_ids, *, system: str | None = None,
                      prompt_len: int | None = None) -> StudentExample:
    """Student sequence for one teacher completion (the sampled ids after `teacher_prompt(question, solution)`)."""
    return self.student_examples([question], [solution], [completion_ids], systems=[system],
                                 prompt_lens=None if prompt_len is None else [prompt_len])[0]

  # ---------------------------------------------------------------------------------------------------------- SFT
  def teacher_sft_example(self, question: str, solution: str, explanation: str) -> SFTExample:
    """Teacher warm-up row: the RL prompt ids + ids of explanation, end tag, <|im_end|> (trained on) and "\n"."""
    prompt = self.teacher_prompt(question, solution)
    comp = self._encode([explanation + self.explanation_tags[1] + EOS_TEXT + "\n"])[0]
    mask = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(comp), bool)])
    mask[-1] = comp[-1] == self.eos_id  # the "\n" after <|im_end|> is never generated; not trained on
    return SFTExample(np.concatenate([prompt, comp]).astype(np.int32), mask)

  def student_sft_example(self, question: str, explanation: str, solution: str,
                          system: str | None = None) -> SFTExample:
    """Student distillation row: the canonical tokenization of the student chat; loss on the assistant turn."""
    system = system or self.student_system
    full = self.student_text(question, explanation, solution, system)
    head = self.chat_text(system, question)
    sys_block = self._sys_block(system)
    ids = np.concatenate([self._system_ids(system), self._encode([full[len(sys_block):]])[0]])
    _, starts, ends = self._gather(ids.astype(np.int64))
    lo, hi = len(head.encode()), len(full.encode()) - 1  # assistant content .. <|im_end|>, not the final "\n"
    return SFTExample(ids.astype(np.int32), (starts >= lo) & (ends <= hi))
