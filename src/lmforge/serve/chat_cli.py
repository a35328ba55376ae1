"""`lmforge chat`: a terminal chat over the same engine and chat template as the server.

Each line typed is a user message; the conversation so far (system message, every earlier turn)
is rendered with `lmforge.tokenizer.chat.render_prompt` and the answer streams as the engine
releases text (never half a character). `/reset` starts a new conversation (the system message
stays), `/quit` or the end of input leaves, Ctrl-C stops the answer being written. When the
history no longer fits the model's context with room for an answer, the oldest turns are dropped
(said on stderr). Works the same when stdin is a pipe: one message per line, answers on stdout.
"""

from __future__ import annotations

import sys

HELP = "commands: /reset (new conversation), /quit (leave), /help"


class ChatSession:
    def __init__(self, model, tokenizer, *, system: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.95, top_k: int = 50, repetition_penalty: float = 1.0,
                 seed: int | None = None):
        from lmforge.infer.batching import BatchEngine

        self.tok = tokenizer
        self.context = int(model.cfg.max_seq_len)
        self.system = system
        self.max_tokens = max_tokens
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
        self.seed = seed
        self.turn = 0
        self.history: list[dict] = []
        self.engine = BatchEngine(model, tokenizer, max_running=1, max_queue=1)
        self.engine.start()

    def close(self) -> None:
        self.engine.shutdown(drain=False)

    def reset(self) -> None:
        self.history = []

    def _messages(self, history) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + history

    def prompt_ids(self, err=sys.stderr) -> list[int] | None:
        """The rendered prompt, dropping the oldest turns until it leaves room for an answer."""
        from lmforge.tokenizer.chat import render_prompt

        hist = list(self.history)
        dropped = 0
        while True:
            ids = render_prompt(self.tok, self._messages(hist))
            if len(ids) < self.context - 1 or len(hist) <= 1:
                break
            hist = hist[2:] if len(hist) > 2 else hist[1:]  # a user turn and its answer
            dropped += 1
        if len(ids) >= self.context - 1:
            print(f"[message too long: {len(ids)} tokens for a context of {self.context}]", file=err, flush=True)
            return None
        if dropped:
            print(f"[dropped the {dropped} oldest turn(s) to fit the model's context]", file=err, flush=True)
            self.history = hist
        return ids

    def answer(self, text: str, out, err=sys.stderr) -> str | None:
        """Stream the answer to `text` to `out`; the answer, or None when the message could not be sent."""
        from lmforge.infer.batching import FinishEvent
        from lmforge.infer.engine import SamplingParams

        self.history.append({"role": "user", "content": text})
        ids = self.prompt_ids(err)
        if ids is None:
            self.history.pop()
            return None
        room = self.context - len(ids)
        seed = None if self.seed is None else self.seed + self.turn
        self.turn += 1
        params = SamplingParams(max_new_tokens=min(self.max_tokens, room), seed=seed, **self.sampling)
        req = self.engine.submit(ids, params)
        parts: list[str] = []
        final = None
        try:
            for ev in req.events():
                piece = ev.text
                if piece:
                    parts.append(piece)
                    out.write(piece)
                    out.flush()
                if isinstance(ev, FinishEvent):
                    final = ev.completion
        except KeyboardInterrupt:
            self.engine.cancel(req.id)
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        reply = final.text if final is not None and final.text is not None else "".join(parts)
        if final is not None and final.finish_reason in ("length", "context"):
            print(f"[answer cut at {len(final.token_ids)} tokens: {final.finish_reason}]", file=err, flush=True)
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def run(self, inp, out, interactive: bool = False, name: str = "", err=sys.stderr) -> int:
        if interactive:
            print(f"lmforge chat: {name}  ({HELP})", file=err, flush=True)
        while True:
            if interactive:
                out.write("you> ")
                out.flush()
            try:
                line = inp.readline()
            except KeyboardInterrupt:
                out.write("\n")
                return 0
            if not line:
                if interactive:
                    out.write("\n")
                return 0
            text = line.rstrip("\r\n")
            cmd = text.strip()
            if not cmd:
                continue
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                self.reset()
                print("[new conversation]", file=err, flush=True)
                continue
            if cmd == "/help":
                print(HELP, file=err, flush=True)
                continue
            if interactive:
                out.write("model> ")
            self.answer(text, out, err)


__all__ = ["ChatSession"]
