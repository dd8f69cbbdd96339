"""How a document and a conversation about it become token ids: the context in front, then the question and the
answer, so that the same conversation ids follow the whole document (the teacher), a cartridge (the student) or
nothing (the base model alone).

With a chat template (SmolLM2's ChatML: ``<|im_start|>system\\n{document}<|im_end|>\\n<|im_start|>user\\n...``) the
document is a system message, as PEFT's ``initialize_kv_prefix_from_text`` tokenizes it, and the conversation is the
part of the template the user and assistant turns add after it; the template gives every turn its own markers, so
the ids of a turn do not depend on what came before. Without one (the library's tiny tokenizer) the layout is plain
text: the document, then ``"\\nQuestion: ...\\nAnswer:"`` and the answer with the EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from softprompt.methods.cartridge import init_token_ids

_PLACEHOLDER = "DOCUMENT"
"""A stand-in system message: a template renders the later turns the same after any system message."""


@dataclass(frozen=True)
class ChatFormat:
    """The token layout of a context and a conversation, for one tokenizer.

    Args:
        tokenizer: the base model's tokenizer.
        use_chat_template: use its chat template where it has one (else plain text).
    """

    tokenizer: Any
    use_chat_template: bool = True

    @property
    def templated(self) -> bool:
        """Whether the tokenizer's chat template is used."""
        return self.use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def context_ids(self, text: str) -> list[int]:
        """The ids of `text` as the context in front of a conversation (exactly what a cartridge initialized from
        the text starts from, `softprompt.methods.cartridge.init_token_ids`)."""
        return init_token_ids(self.tokenizer, text, self.use_chat_template)

    def prompt_ids(self, question: str) -> list[int]:
        """The ids of a user turn asking `question`, up to where the assistant's answer starts."""
        if not self.templated:
            return self._encode(f"\nQuestion: {question}\nAnswer:")
        return self._encode(self._after_system([{"role": "user", "content": question}], add_generation_prompt=True))

    def answer_ids(self, question: str, answer: str) -> list[int]:
        """The ids of `answer` and the end of its turn, following ``prompt_ids(question)``."""
        if not self.templated:
            return self._encode(f" {answer}") + [self.tokenizer.eos_token_id]
        turns = [{"role": "user", "content": question}]
        prompt = self._after_system(turns, add_generation_prompt=True)
        whole = self._after_system([*turns, {"role": "assistant", "content": answer}], add_generation_prompt=False)
        if not whole.startswith(prompt):
            raise ValueError(
                "The tokenizer's chat template renders an assistant turn that does not continue its generation "
                "prompt, so answers cannot be scored after the prompt. Fix: use_chat_template=False."
            )
        return self._encode(whole[len(prompt):])

    def conversation_ids(self, question: str, answer: str) -> list[int]:
        """``prompt_ids(question) + answer_ids(question, answer)``: what follows the context."""
        return self.prompt_ids(question) + self.answer_ids(question, answer)

    def _after_system(self, turns: list[dict[str, str]], add_generation_prompt: bool) -> str:
        system = [{"role": "system", "content": _PLACEHOLDER}]
        head = self.tokenizer.apply_chat_template(system, tokenize=False)
        whole = self.tokenizer.apply_chat_template(system + turns, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)
        if not whole.startswith(head):
            raise ValueError(
                "The tokenizer's chat template renders a system message differently once more turns follow, so a "
                "document's cache cannot be reused in front of them. Fix: use_chat_template=False."
            )
        return whole[len(head):]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
