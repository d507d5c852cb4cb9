"""The real Qwen2.5 tokenizer loads from a local directory and renders ChatML."""
from rlt_jax import hf_checkpoint


def test_chat_template_renders_chatml(qwen_dir):
  tok = hf_checkpoint.load_tokenizer(qwen_dir)
  messages = [{"role": "system", "content": "You are a teacher."},
              {"role": "user", "content": "What is 2+3?"},
              {"role": "assistant", "content": "5"}]
  text = tok.apply_chat_template(messages, tokenize=False)
  assert text == ("<|im_start|>system\nYou are a teacher.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                  "<|im_start|>assistant\n5<|im_end|>\n")
  ids = tok.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=True)
  ids = ids["input_ids"] if hasattr(ids, "keys") else ids
  assert tok.decode(ids).endswith("<|im_start|>assistant\n")
  assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") == 151644
  assert tok.convert_tokens_to_ids("<|im_end|>") == 151645 and tok.pad_token_id == 151643
  assert len(tok) == 151665
