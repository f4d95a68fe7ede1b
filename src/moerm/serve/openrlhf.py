"""Splitting OpenRLHF queries (prompt + response as one decoded string) back into prompt and response.

OpenRLHF's remote reward protocol posts `{"query": [...], "prompts": [...], "labels": [...]}` where each query is
the policy's whole decoded sequence (it may carry left padding and a final EOS). For query i:

1. Padding / boundary tokens (`strip_tokens`) are removed from both ends of the query (and of `prompts[i]`).
2. If `prompts[i]` is given and the query starts with it, the response is the rest of the query.
3. Otherwise the query is matched against the query template, e.g. ChatML
   `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{response}<|im_end|>`: the prompt is everything
   up to the template's *last* prompt/response separator (so multi-turn prompts stay whole), the response the rest.
   The text before `{prompt}` and after `{response}` is optional, so a query that lost its first or last tokens
   still splits.
4. Either way the template's markup is peeled off the two parts (the text before `{prompt}` and the separator from
   the prompt, the text after `{response}` from the response), so the reward model sees plain prompt and response.

A query that neither starts with its prompt nor matches the template raises `SplitError` naming its index.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from moerm.errors import UserError


class SplitError(UserError):
    """Query `index` could not be split into prompt and response."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def _optional(literal: str) -> str:
    """A regex matching `literal` or nothing."""
    return f"(?:{re.escape(literal)})?" if literal else ""


class QuerySplitter:
    """Splits queries with a `{prompt}<separator>{response}` template; see the module docstring for the rules."""

    def __init__(self, template: str, strip_tokens: Sequence[str] = ()):
        p, r = template.find("{prompt}"), template.find("{response}")
        if p < 0 or r < p + len("{prompt}") + 1:
            raise UserError(f"template needs '{{prompt}}', a separator, then '{{response}}'; got {template!r}")
        self.template = template
        self.strip_tokens = tuple(t for t in strip_tokens if t)
        self._pre = template[:p]
        self._sep = template[p + len("{prompt}"):r]
        self._post = template[r + len("{response}"):]
        self._regex = re.compile("^" + _optional(self._pre) + "(?P<prompt>.*)" + re.escape(self._sep)
                                 + "(?P<response>.*?)" + _optional(self._post) + "$", re.DOTALL)

    def strip(self, text: str) -> str:
        """Remove padding / boundary tokens from both ends, repeatedly."""
        changed = True
        while changed and text:
            changed = False
            for tok in self.strip_tokens:
                if text.startswith(tok):
                    text, changed = text[len(tok):], True
                if text.endswith(tok):
                    text, changed = text[: -len(tok)], True
        return text

    def _clean_prompt(self, prompt: str) -> str:
        if self._pre and prompt.startswith(self._pre):
            prompt = prompt[len(self._pre):]
        if self._sep and prompt.endswith(self._sep):
            prompt = prompt[: -len(self._sep)]
        return prompt

    def _clean_response(self, response: str) -> str:
        if self._post and response.endswith(self._post):
            response = response[: -len(self._post)]
        return response

    def split(self, query: str, prompt: str | None = None, index: int = 0) -> tuple[str, str]:
        """(prompt, response) of one query."""
        q = self.strip(query)
        if prompt is not None:
            p = self.strip(prompt)
            if p and q.startswith(p):
                return self._clean_prompt(p), self._clean_response(self.strip(q[len(p):]))
        m = self._regex.match(q)
        if m is None:
            why = "it does not start with prompts[{i}] and " if prompt is not None else ""
            raise SplitError(index, (why.format(i=index) + f"it does not contain the query template's separator "
                                     f"{self._sep!r}; set --query-template to the policy's chat format, or send "
                                     f"`prompts`"))
        return m.group("prompt"), m.group("response")

    def split_all(self, queries: Sequence[str], prompts: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
        """Prompts and responses of every query; `prompts`, when given, must be as long as `queries`."""
        if prompts is not None and len(prompts) != len(queries):
            raise ValueError(f"{len(prompts)} prompts for {len(queries)} queries")
        ps: list[str] = []
        rs: list[str] = []
        for i, q in enumerate(queries):
            p, r = self.split(q, prompts[i] if prompts is not None else None, i)
            ps.append(p)
            rs.append(r)
        return ps, rs
