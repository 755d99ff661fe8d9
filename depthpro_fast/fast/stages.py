"""The fast engine's implementations of the stages of ``depthpro_fast.dataflow``.

``FastStages`` runs the network's one data flow (``dataflow.run_network``) with:

- the ViTs of the engine (fused epilogues, compiled blocks or the reference modules: the
  engine's ``_vit``), the image and FOV encoders on a second CUDA stream while the patch encoder
  runs on the caller's stream; both read the level-2 windows of ``split_patches`` (spec §15:
  the same tensor as the FOV's 0.25 resize);
- merges written straight in channels_last, the folded / converted conv layers of
  ``PreparedLayers`` (``fast/folds.py``);
- the decoder's and head's epilogue ops when ``FastOptions.decoder_epilogues`` /
  ``head_tail`` are on (``fast/decoder.py``), on the epilogue backend.

Stream discipline: the side stream waits for the split; the caller's stream waits for an event
recorded after each side result before using it (``_OnSideStream.get``), and tensors crossing
streams are marked with ``record_stream`` so the caching allocator never hands their memory out
too early. The image encoder's event is recorded after all side work when the FOV is not
computed, so using its tokens joins the side stream (required inside a CUDA-graph capture).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import ops
from ..dataflow import Mark, Ready, Stages, ViTOutputs, decode
from ..op_common import tokens_to_maps

if TYPE_CHECKING:
    from .engine import FastEngine, PreparedLayers


class _OnSideStream:
    """A tensor computed on ``side``: ``get()`` makes the caller's stream wait for it (once)."""

    def __init__(self, value: torch.Tensor, done: torch.cuda.Event, main: torch.cuda.Stream):
        self.value, self.done, self.main = value, done, main
        self.joined = False

    def get(self) -> torch.Tensor:
        if not self.joined:
            self.main.wait_event(self.done)
            self.value.record_stream(self.main)
            self.joined = True
        return self.value


class FastStages(Stages):
    """The stages of the fast path for one call (``engine``, its prepared layers, the side
    stream or None)."""

    def __init__(self, engine: FastEngine, prepared: PreparedLayers,
                 side: torch.cuda.Stream | None):
        m = engine.model
        super().__init__(m.encoder, m.decoder, m.head, m.fov)
        self.engine, self.p, self.side = engine, prepared, side
        self.opts = engine.options
        self.backend = m.backend

    def _cl(self, t: torch.Tensor) -> torch.Tensor:
        if self.opts.channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    @staticmethod
    def _run(layers, t: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            t = layer(t)
        return t

    # -- encoder ----------------------------------------------------------------------------

    def _fov_tokens(self, level2: torch.Tensor) -> torch.Tensor:
        """The FOV encoder's final-normed tokens through its Linear: (B, 577, D/2)."""
        vit, linear = self.fov_network.encoder[0], self.fov_network.encoder[1]
        return F.linear(self.engine._vit(vit, level2)[0], linear.weight, linear.bias)

    def vits(self, x: torch.Tensor, patches: torch.Tensor, level2: torch.Tensor,
             compute_fov: bool, mark: Mark = lambda stage: None) -> ViTOutputs:
        enc, vit, side = self.encoder, self.engine._vit, self.side
        # the ViTs in lock-step (fast/lockstep.py), no side stream; a symbolic batch (as
        # torch.export traces it) runs them one by one: the row groups are per concrete batch
        if self.p.lockstep is not None and isinstance(patches.shape[0], int):
            inputs, hooks = [patches, level2], [tuple(enc.hook_block_ids), ()]
            if compute_fov:
                inputs.append(level2)
                hooks.append(())
            outs = self.engine._lockstep_vits(inputs, hooks)
            fov = None
            if compute_fov:
                linear = self.fov_network.encoder[1]
                fov = Ready(F.linear(outs[2][0], linear.weight, linear.bias))
            for stage in ("patch encoder", "image encoder", "FOV encoder"):
                mark(stage)
            return ViTOutputs(outs[0][0], outs[0][1], Ready(outs[1][0]), fov)
        if side is None:
            image = Ready(vit(enc.image_encoder, level2)[0])
            fov = Ready(self._fov_tokens(level2)) if compute_fov else None
        else:
            main = torch.cuda.current_stream(x.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                image_tokens = vit(enc.image_encoder, level2)[0]
                image_done = torch.cuda.Event()
                image_done.record(side)
                fov = None
                if compute_fov:
                    fov_tokens = self._fov_tokens(level2)
                    fov_done = torch.cuda.Event()
                    fov_done.record(side)
                    fov = _OnSideStream(fov_tokens, fov_done, main)
            patches.record_stream(side)
            image = _OnSideStream(image_tokens, image_done, main)
        tokens, hooks = vit(enc.patch_encoder, patches, enc.hook_block_ids)
        mark("patch encoder")
        mark("image encoder")
        mark("FOV encoder")
        return ViTOutputs(tokens, hooks, image, fov)

    def merge(self, tokens: torch.Tensor, batch: int, level: tuple[int, int]) -> torch.Tensor:
        # as the reference stage, written straight in channels_last when wanted
        return ops.merge_patches(tokens, batch_size=batch, grid=level[0], padding=level[1],
                                 channels_last=self.opts.channels_last, backend=self.backend)

    def upsample(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self._run(getattr(self.p, name), self._cl(t))

    def lowres(self, x2: torch.Tensor, global_map: torch.Tensor) -> torch.Tensor:
        p = self.p
        if p.lowres is not None:  # fold 4: one deconv over cat(x2, g)
            return p.lowres(self._cl(torch.cat([x2, global_map], dim=1)))
        cat = torch.cat([self._run(p.upsample2, self._cl(x2)),
                         p.upsample_lowres(self._cl(global_map))], dim=1)
        return p.fuse_lowres(cat)

    # -- decoder, head, FOV -----------------------------------------------------------------

    @staticmethod
    def _residual(x: torch.Tensor, convs) -> torch.Tensor:
        t = convs[0](F.relu(x))
        return convs[1](t.relu_()).add_(x)

    def decoder(self, encodings: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.p
        if p.epilogue_decoder is not None:
            return p.epilogue_decoder(encodings,
                                      self.engine.epilogue_backends(encodings[0].device))
        last = len(encodings) - 1

        def project(i: int, e: torch.Tensor) -> torch.Tensor:
            c = p.dec_convs[i]
            return e if c is None else c(e)

        def fuse(i: int, f: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
            res1, res2, tail = p.fusions[i]
            if skip is not None:
                f = f + self._residual(skip, res1)
            return self._run(tail, self._residual(f, res2))

        assert len(p.fusions) == last + 1
        return decode(encodings, project, fuse)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        p = self.p
        t = p.head0(features)
        if p.fused_tail is not None:
            return p.fused_tail(t, self.engine.epilogue_backends(t.device))
        if p.subpixel is not None:
            return p.subpixel(t)
        deconv, conv3, conv_out = p.head_rest
        return conv_out(conv3(deconv(t)).relu_()).relu_()

    def fov(self, fov_tokens: torch.Tensor, lowres: torch.Tensor,
            intermediates=None) -> torch.Tensor:
        p = self.p
        down = p.fov_down(lowres).relu_()
        z = self._cl(tokens_to_maps(fov_tokens)) + down
        c0, c1, c2 = p.fov_head
        return c2(c1(c0(z).relu_()).relu_())
