"""The training loop: one optimizer step of the autoencoder, then one of the discriminators, repeated."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.profiler import record_function

from ..checkpoints import save_model
from ..device import resolve_precision
from ..metrics import psnr
from ..text import load_text_encoder
from . import distributed
from .captions import CaptionEmbedder
from .checkpoint import latest_checkpoint, model_from_checkpoint, read_checkpoint, write_checkpoint
from .config import ConfigError, TrainConfig
from .data import (IMAGE, VIDEO, BatchPlan, SampleSettings, TrainingBatches, make_loader, read_sources,
                   to_unit_range, validation_clips)
from .ema import EMA
from .history import TrainingHistory
from .losses import (LastLayerTap, LossWeights, PatchDiscriminator, ReconstructionLoss, adaptive_weight,
                     hinge_discriminator_loss, hinge_generator_loss, lpips_vgg)
from .monitor import Monitor
from .resident import PACK_SEPARATOR, FrameStore, ResidentBatches, ResidentLoader
from .start import VIDEO_ONLY, build_model, resolve_weights, select_trainable

logger = logging.getLogger(__name__)


class Trainer:
    """Builds everything a run needs from a `TrainConfig`; `run()` trains and returns the run folder."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.run_dir = Path(config.run.output)
        self.context = distributed.setup(config.run.device, config.distributed.strategy, config.distributed.backend)
        self.device = self.context.device
        self.precision = resolve_precision(config.run.precision, self.device, config.run.memory_format,
                                           training=True)
        self.autocast_dtype = None if self.precision.dtype == torch.float32 else self.precision.dtype
        self.memory_format = self.precision.memory_format
        self._log_main(f"precision: {self.precision.describe()} on {self.device}")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # batch shapes are fixed: let cuDNN time its algorithms once
        resume_from = self._resume_source()
        torch.manual_seed(config.run.seed)  # the same initial weights on every rank
        self._build_model()
        self._build_losses()
        self._build_optimizers()
        self._build_data()
        self.generator = torch.Generator(self.device).manual_seed(config.run.seed * 1009 + self.context.rank)
        self.step = 0
        self.trained_seconds = 0.0  # time spent in training steps, over all launches of the run
        self.data_position = 0  # micro-batches consumed
        self._history: list[dict] = []  # each step's metrics, device tensors among them
        self.samples_seen = 0  # clips and images trained on, over all processes and launches of the run
        self.curve = TrainingHistory.continuing(self._start_folder(), self.run_dir.name)
        self.skipped_samples = 0
        self.unreadable: dict[str, str] = {}  # path -> reason, files this rank found unreadable
        self._reported: set[str] = set()
        if resume_from is not None:
            self._restore(read_checkpoint(resume_from))
            self._log_main(f"resumed from {resume_from} at step {self.step}")

    # ---- set-up ---------------------------------------------------------------------------------

    def _resume_source(self) -> Path | None:
        choice = self.config.run.resume
        latest = latest_checkpoint(self.run_dir)
        if choice == "auto":
            return latest
        if choice == "never":
            if latest is not None:
                raise ConfigError(f"{self.run_dir} already holds checkpoints of a run: continue it with "
                                  "run.resume=auto or choose another run.output")
            return None
        path = Path(choice)
        if not path.is_file():
            raise ConfigError(f"run.resume: no checkpoint file at {path} (or use auto / never)")
        return path

    def _start_folder(self) -> Path | None:
        """The model folder a pretrained run starts from (its learning curve continues), if any."""
        model = self.config.model
        if model.init != "pretrained" or not model.weights:
            return None
        folder = resolve_weights(model.weights)
        return folder if folder.is_dir() else None

    def _build_model(self) -> None:
        config = self.config
        model = build_model(config.model)
        trainable = select_trainable(model, config.model.trainable)
        if config.data.image_every and all(VIDEO_ONLY.search(name) for name in trainable):
            raise ConfigError("only temporal parameters train, and image batches never use them: "
                              "set data.image_every=0")
        if config.model.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        # FSDP shards only contiguous parameters; inputs still arrive in self.memory_format
        fsdp = self.context.strategy == "fsdp"
        model.to(self.device, memory_format=torch.contiguous_format if fsdp else self.memory_format)
        self.embedder = self._text_embedder(model)
        self.tap = LastLayerTap(model.decoder.conv_out)
        if fsdp:
            distributed.shard_fsdp(model)
            self.engine = model
        else:
            self.engine = distributed.wrap_ddp(model, self.context, find_unused=config.data.image_every > 0)
        # compiled for video batches only: image batches (another graph, minutes more to compile) run eagerly
        self.video_engine = (self.engine if config.run.compile == "none"
                             else torch.compile(self.engine, mode=config.run.compile))
        self.model = model
        self.trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        counts = sum(p.numel() for p in self.trainable.values()), sum(p.numel() for p in model.parameters())
        self._log_main(f"model: {counts[0]:,} of {counts[1]:,} parameters train ({', '.join(config.model.trainable)})")

    def _text_embedder(self, model) -> CaptionEmbedder | None:
        text, cfg = self.config.text, model.cfg
        if not cfg.has_text:
            if text.encoder:
                raise ConfigError(f"text.encoder={text.encoder} is set but the model has no text cross-attention")
            return None
        if not text.encoder:
            raise ConfigError(f"the model is text-conditioned (context_dim={cfg.context_dim}): set text.encoder "
                              "(minilm, t5, or a Hugging Face model folder)")
        encoder = load_text_encoder(text.encoder, device=self.device)
        if encoder.dim != cfg.context_dim:
            raise ConfigError(f"text.encoder {text.encoder} gives {encoder.dim}-wide embeddings; the model's "
                              f"cross-attention expects context_dim={cfg.context_dim}")
        return CaptionEmbedder(encoder, text.cache)

    def _build_losses(self) -> None:
        loss = self.config.loss
        random_backbone = loss.lpips_vgg_weights == "random"
        perceptual = lpips_vgg(None if random_backbone else loss.lpips_vgg_weights, random_backbone) if loss.lpips else None
        weights = LossWeights(loss.l1, loss.lpips, loss.kl, loss.disc_weight, loss.adaptive_weight)
        self.criterion = ReconstructionLoss(weights, perceptual).to(self.device)
        self.discriminators = torch.nn.ModuleDict({
            VIDEO: PatchDiscriminator(3, filters=loss.disc_filters, layers=loss.disc_layers),
            IMAGE: PatchDiscriminator(2, filters=loss.disc_filters, layers=loss.disc_layers),
        }).to(self.device)
        self.disc_engines = {kind: distributed.wrap_ddp(d, self.context, find_unused=False)
                             for kind, d in self.discriminators.items()}

    def _build_optimizers(self) -> None:
        optim = self.config.optim
        self.optimizer = _optimizer(optim, list(self.trainable.values()), optim.lr)
        self.disc_optimizer = _optimizer(optim, list(self.discriminators.parameters()), optim.disc_lr or optim.lr)
        self.ema = EMA(self.trainable, optim.ema_decay) if optim.ema_decay else None

    def _build_data(self) -> None:
        data, ctx = self.config.data, self.context
        columns = dict(root=data.root, path_column=data.path_column, caption_column=data.caption_column)
        videos = read_sources(data.videos, VIDEO, **columns)
        images = read_sources(data.images, IMAGE, **columns) if data.images else []
        plan = BatchPlan(len(videos), len(images or videos), data.batch_size, data.image_batch_size or data.batch_size,
                         data.image_every, ctx.world, ctx.rank, self.config.run.seed)
        settings = SampleSettings(data.frames, data.stride, self.config.size, self.config.text.caption_dropout,
                                  self.config.run.seed)
        self.dataset = self._batches(plan, videos, images, settings)
        validation = self.config.validation
        self.validation_items = (read_sources(validation.videos, VIDEO, **columns)[: validation.clips]
                                 if validation.videos and validation.clips else [])
        self._validation_clips = None
        self._log_main(f"data: {len(videos)} videos, {len(images)} images"
                       + ({0: "", 1: ", images only"}.get(data.image_every, f", one batch in {data.image_every} of images")))

    def _batches(self, plan: BatchPlan, videos: list, images: list, settings: SampleSettings) -> TrainingBatches:
        """Batches decoded by workers, or cut from frames held resident (packs always are)."""
        items = videos + images
        if self.config.data.loader != "resident" and not any(PACK_SEPARATOR in item.path for item in items):
            return TrainingBatches(plan, videos, images, settings)
        if self.config.data.loader != "resident":
            raise ConfigError("data: frame packs need data.loader=resident")
        started = time.perf_counter()
        store = FrameStore.build(items, settings.size, self.device)
        where = next(iter(store.frames.values())).device if store.frames else self.device
        self._log_main(f"data: {len(store.frames)} files resident as uint8 on {where} "
                       f"({store.nbytes / 1e9:.2f} GB, {time.perf_counter() - started:.1f} s to load)")
        return ResidentBatches(plan, videos, images, settings, store)

    def _loader(self):
        if isinstance(self.dataset, ResidentBatches):
            return ResidentLoader(self.dataset, self.data_position)
        return iter(make_loader(self.dataset, self.data_position, self.config.data.workers,
                                self.config.data.prefetch, pin_memory=self.device.type == "cuda"))

    # ---- the loop -----------------------------------------------------------------------------

    def run(self, until: int | None = None) -> Path:
        """Train to `run.steps` (or stop after step `until`), checkpointing on the way; returns the run folder."""
        run = self.config.run
        last = min(run.steps, until) if until is not None else run.steps
        if self.context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._record_config()
        monitor = Monitor(self.run_dir, self.context.is_main, run.steps, self.step, run.progress)
        batches = self._loader()
        state = None
        self._stop = False
        try:
            window = _Window()
            while self.step < last and not self._stop:
                metrics = self.train_step(batches)
                self.trained_seconds += metrics["time/step"]
                window.add(metrics)
                monitor.advance()
                logging_step = self.step % run.log_every == 0 or self.step == last
                if logging_step:
                    self._report(monitor, window)
                    window = _Window()
                if logging_step or not self.context.distributed:
                    self._stop = self._out_of_time()
                if self._due(self.config.validation.every, last):
                    self.validate(monitor)
                if self.step % run.checkpoint_every == 0 or self.step == last or self._stop:
                    state = self.save_checkpoint()
            if (self.step >= run.steps or self._stop) and run.export_model:
                state = state or self.save_checkpoint()
                if self.context.is_main:
                    folder = save_model(model_from_checkpoint(state, use_ema=True), self.run_dir / "model",
                                        overwrite=True)
                    self.curve.save(folder)
                    monitor.message(f"exported the trained model to {folder}")
        finally:
            monitor.close()
        return self.run_dir

    def _record_config(self) -> None:
        """config.yaml holds the run's settings and what `auto` resolved to; a launch that continues
        the run under other settings keeps it and writes its own beside it, saying what changed."""
        text = self.config.to_yaml() + yaml.safe_dump({"resolved": self._resolved()}, sort_keys=False)
        path = self.run_dir / "config.yaml"
        if path.is_file() and self.step > 0:
            before = yaml.safe_load(path.read_text()) or {}
            before.pop("resolved", None)
            changed = _changed_keys(before, self.config.to_dict())
            if not changed:
                return
            path = self.run_dir / f"config.resumed-at-step-{self.step:08d}.yaml"
            logger.warning("continuing %s at step %d with changed settings (%s); the first launch's are kept in "
                           "config.yaml, these in %s", self.run_dir, self.step, ", ".join(changed), path.name)
        path.write_text(text)

    def _resolved(self) -> dict:
        return {"device": str(self.device), "precision": self.precision.dtype_name,
                "memory_format": self.precision.layout_name, "why": self.precision.reason,
                "world_size": self.context.world, "compile": self.config.run.compile}

    def _progress(self) -> float:
        """How far the run is, 0 to 1: by steps, or by training time when `run.max_seconds` runs out first."""
        run = self.config.run
        progress = self.step / max(1, run.steps - 1)
        if run.max_seconds:
            progress = max(progress, self.trained_seconds / run.max_seconds)
        return min(1.0, progress)

    def _out_of_time(self) -> bool:
        """Whether `run.max_seconds` of training time are spent (rank 0 decides for all; asked on
        logging steps only, since agreeing takes a collective that waits for the device)."""
        if not self.config.run.max_seconds:
            return False
        spent = self.trained_seconds >= self.config.run.max_seconds
        return self.context.mean(float(spent) if self.context.is_main else 0.0) > 0

    def _due(self, every: int, last: int) -> bool:
        return bool(self.validation_items) and (self.step % every == 0 or self.step == last or self._stop)

    def train_step(self, batches) -> dict:
        """One optimizer step of the autoencoder over `grad_accum` micro-batches, then one of the discriminators.

        Nothing here waits for the device: loss terms and the gradient norm stay device tensors
        (read on logging steps), and batches are cut or copied asynchronously."""
        optim, loss_config = self.config.optim, self.config.loss
        gan_on = self.step >= loss_config.disc_start
        started = time.perf_counter()
        self._set_learning_rate()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict = defaultdict(float)
        pending = []
        for micro in range(optim.grad_accum):
            with record_function("step/data"):
                batch = next(batches)
            self._note_batch(batch)
            with distributed.gradient_sync(self.engine, micro == optim.grad_accum - 1):
                with record_function("step/forward"):
                    terms, total, reconstruction, target = self._autoencoder_pass(batch, gan_on)
                with record_function("step/backward"):
                    (total / optim.grad_accum).backward()
            for name, value in terms.items():
                sums[f"loss/{name}"] = sums[f"loss/{name}"] + value / optim.grad_accum
            sums[f"count/{batch['kind']}"] += len(batch["captions"])
            if gan_on:
                pending.append((target, reconstruction, batch["kind"]))
        with record_function("step/optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), optim.grad_clip or math.inf)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            self.optimizer.step()
        sums["loss/disc"] = self._discriminator_step(pending) if gan_on else 0.0
        if self.ema is not None:
            with record_function("step/ema"):
                self.ema.update(self.step)
        self.step += 1
        self.samples_seen += int(sums.get("count/video", 0) + sums.get("count/image", 0)) * self.context.world
        metrics = dict(sums, **{"train/grad_norm": grad_norm.detach(), "train/lr": self.optimizer.param_groups[0]["lr"],
                                "time/step": time.perf_counter() - started})
        self._history.append(metrics)
        return metrics

    @property
    def history(self) -> list[dict[str, float]]:
        """The metrics of every step of this launch, as numbers (reading them waits for the device)."""
        return [{name: float(value) for name, value in metrics.items()} for metrics in self._history]

    def _set_learning_rate(self) -> None:
        optim = self.config.optim
        lr = optim.lr
        if optim.schedule == "cosine":
            progress = self._progress()
            lr = optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        scale = min(1.0, (self.step + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = lr * scale

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _context(self, captions: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.embedder is None:
            return None, None
        return self.embedder(captions, self.device)

    def _autoencoder_pass(self, batch: dict, gan_on: bool):
        """Loss terms, the objective, and the detached reconstruction and target of one micro-batch."""
        pixels = batch["pixels"].to(self.device, non_blocking=True)  # uint8: a quarter of float32's bytes
        x = to_unit_range(pixels).contiguous(memory_format=self.memory_format)
        context, mask = self._context(batch["captions"])
        self.tap.clear()
        engine = self.video_engine if batch["kind"] == VIDEO else self.engine
        with self._autocast():
            out = engine(x, context=context, context_mask=mask,
                         sample_posterior=self.config.model.sample_posterior, generator=self.generator)
            terms = self.criterion(x, out.sample, out.latent_dist.kl())
            total = terms["total"]
            if gan_on:
                discriminator = self.discriminators[batch["kind"]].requires_grad_(False)
                g_loss = hinge_generator_loss(discriminator(out.sample))
                discriminator.requires_grad_(True)
                weight = self._gan_weight(terms["nll"], g_loss)
                total = total + weight * g_loss
                terms.update(g=g_loss, gan_weight=weight, total=total)
        terms = {name: value.detach() for name, value in terms.items()}
        return terms, total, out.sample.detach(), x

    def _gan_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        weight = self.config.loss.disc_weight
        if not self.config.loss.adaptive_weight or not self.tap.output.requires_grad:
            return torch.tensor(weight, device=self.device)
        return adaptive_weight(self.tap.weight_grad(nll), self.tap.weight_grad(g_loss)) * weight

    def _discriminator_step(self, pending: list) -> torch.Tensor:
        """Hinge loss on real clips against the (detached) reconstructions; returns the mean loss."""
        self.disc_optimizer.zero_grad(set_to_none=True)
        last_use = {kind: i for i, (_, _, kind) in enumerate(pending)}
        total = 0.0
        for i, (real, fake, kind) in enumerate(pending):
            engine = self.disc_engines[kind]
            with distributed.gradient_sync(engine, last_use[kind] == i), self._autocast():
                loss = hinge_discriminator_loss(engine(real), engine(fake))
                (loss / len(pending)).backward()
            total = total + loss.detach() / len(pending)
        self.disc_optimizer.step()
        return total

    def _note_batch(self, batch: dict) -> None:
        self.data_position += 1
        self.skipped_samples += len(batch["skipped"])
        for path, reason in batch["skipped"]:
            self.unreadable.setdefault(path, reason)
        if self.config.run.trace_data:
            traces = self.context.gather_objects({"rank": self.context.rank, "batch": batch["index"],
                                                  "kind": batch["kind"], "paths": batch["paths"]})
            if self.context.is_main:
                with (self.run_dir / "data-trace.jsonl").open("a") as handle:
                    handle.writelines(json.dumps(trace) + "\n" for trace in traces)

    # ---- reports --------------------------------------------------------------------------------

    def _report(self, monitor: Monitor, window: _Window) -> None:
        """Scalars of the steps since the last report: the one place where the loop reads the device."""
        means = {name: self.context.mean(float(value)) for name, value in window.means().items()}
        clips = self.context.mean(window.totals.get("count/video", 0.0)) * self.context.world
        images = self.context.mean(window.totals.get("count/image", 0.0)) * self.context.world
        seconds = max(window.seconds, 1e-9)
        skipped = self.context.gather_objects((self.skipped_samples, self.unreadable))
        unreadable = {path: reason for _, files in skipped for path, reason in files.items()}
        scalars = {name: value for name, value in means.items() if not name.startswith(("count/", "time/"))}
        scalars.update({"speed/clips_per_s": clips / seconds, "speed/images_per_s": images / seconds,
                        "data/skipped_samples": sum(count for count, _ in skipped),
                        "data/unreadable_files": len(unreadable), "train/samples": self.samples_seen})
        monitor.scalars(self.step, scalars)
        monitor.summary({"loss": means.get("loss/total", math.nan)})
        self.curve.add(self.samples_seen, self.step, {k: v for k, v in scalars.items() if k.startswith("loss/")})
        for path in sorted(set(unreadable) - self._reported):
            monitor.message(f"skipped unreadable or too short file {path}: {unreadable[path]}")
        self._reported = set(unreadable)

    def validate(self, monitor: Monitor | None = None) -> dict[str, float]:
        """PSNR and SSIM of the validation clips (EMA weights when there are), on rank 0 (every rank under FSDP)."""
        if not self.validation_items or not (self.context.is_main or self.context.strategy == "fsdp"):
            return {}
        if self._validation_clips is None:
            data = self.config.data
            default_stride = data.stride if isinstance(data.stride, int) else min(data.stride)
            stride = self.config.validation.stride or default_stride
            self._validation_clips = validation_clips(self.validation_items, data.frames, stride,
                                                      self.config.validation_size)
        pairs, psnrs, ssims = [], [], []
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            self.model.eval()
            with torch.no_grad(), self._autocast():
                for clip, item in self._validation_clips:
                    x = clip[None].to(self.device, memory_format=self.memory_format)
                    context, mask = self._context([item.caption])
                    reconstruction = self.model(x, context=context, context_mask=mask).sample.float()
                    psnrs.append(psnr(x, reconstruction))
                    ssims.append(_ssim(x[0], reconstruction[0]))
                    pairs.append((x[0].cpu(), reconstruction[0].cpu()))
            self.model.train()
        result = {"val/psnr": sum(psnrs) / len(psnrs), "val/ssim": sum(ssims) / len(ssims)} if psnrs else {}
        if result:
            self.curve.add(self.samples_seen, self.step, result)
        if monitor is not None and result:
            monitor.scalars(self.step, result)
            monitor.samples(self.step, pairs[: self.config.validation.samples])
            monitor.message(f"step {self.step}: validation PSNR {result['val/psnr']:.2f} dB, SSIM {result['val/ssim']:.4f}")
        return result

    def _log_main(self, text: str) -> None:
        if self.context.is_main:
            logger.info(text)

    # ---- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> dict | None:
        """Write a checkpoint (rank 0); every rank must call it. Returns the saved state on rank 0."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=self.context.distributed)
        model_state = get_model_state_dict(self.model, options=options)
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        ema_state = self.ema.state_dict() if self.ema is not None else None
        rng = self.context.gather_objects(self._rng_state())
        if not self.context.is_main:
            return None
        state = {"step": self.step, "data_position": self.data_position, "trained_seconds": self.trained_seconds,
                 "model": model_state,
                 "optimizer": optimizer_state, "discriminators": self.discriminators.state_dict(),
                 "disc_optimizer": self.disc_optimizer.state_dict(), "ema": ema_state, "rng": rng,
                 "world": self.context.world, "model_config": _plain(self.model.cfg.to_dict()),
                 "config": self.config.to_dict(), "skipped_samples": self.skipped_samples,
                 "samples_seen": self.samples_seen, "curve": self.curve.state_dict()}
        write_checkpoint(self.run_dir, self.step, state, self.config.run.keep_checkpoints)
        return state

    def _restore(self, state: dict) -> None:
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        self.discriminators.load_state_dict(state["discriminators"])
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ConfigError("optim.ema_decay is set but the checkpoint has no EMA weights")
            self.ema.load_state_dict(state["ema"])
        self.step, self.data_position = int(state["step"]), int(state["data_position"])
        self.skipped_samples = int(state.get("skipped_samples", 0))
        self.samples_seen = int(state.get("samples_seen", 0))
        if "curve" in state:
            self.curve.load_state_dict(state["curve"])
        self.trained_seconds = float(state.get("trained_seconds", 0.0))
        if state.get("world") == self.context.world:
            self._set_rng_state(state["rng"][self.context.rank])
        else:
            logger.warning("resuming with %s processes instead of %s: random states start afresh",
                           self.context.world, state.get("world"))

    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "posterior": self.generator.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        self.generator.set_state(state["posterior"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def close(self) -> None:
        self.tap.remove()
        self.context.close()


def _optimizer(optim, parameters: list, lr: float) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    # fused Adam: one kernel for all parameters, and its step counters never need reading on the host;
    # not for FSDP's sharded parameters (DTensors)
    fused = optim.fused
    if fused is None:
        fused = not any(hasattr(p, "device_mesh") for p in parameters)
    return torch.optim.Adam(parameters, lr=lr, betas=tuple(optim.betas), eps=optim.eps,
                            weight_decay=optim.weight_decay, fused=fused or None)


def _changed_keys(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (run.resume and run.steps aside)."""
    changed = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_keys(old, new, f"{prefix}{key}.")
        elif old != new and f"{prefix}{key}" not in ("run.resume", "run.steps"):
            changed.append(f"{prefix}{key}")
    return changed


class _Window:
    """Sums of the metrics of the steps since the last report."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.seconds = 0.0

    def add(self, metrics: dict[str, float]) -> None:
        self.steps += 1
        self.seconds += metrics.get("time/step", 0.0)
        for name, value in metrics.items():
            self.totals[name] += value

    def means(self) -> dict[str, float]:
        return {name: value / max(self.steps, 1) for name, value in self.totals.items()}


def _plain(values: dict) -> dict:
    """Tuples as lists: checkpoints load with weights_only, and config.json keeps lists anyway."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _ssim(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Mean per-frame SSIM on [0, 1] (scikit-image, data range of each reference frame), as the authors evaluate."""
    from skimage.metrics import structural_similarity

    truth = ((reference.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy()
    recon = ((reconstruction.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy()
    scores = [structural_similarity(t, r, channel_axis=-1, data_range=max(float(t.max() - t.min()), 1e-6))
              for t, r in zip(truth, recon)]
    return float(sum(scores) / len(scores))
