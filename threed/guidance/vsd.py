"""Variational score distillation (ProlificDreamer, Wang et al. 2023).

SDS treats the scene as one point and pulls each render toward the prior's mode, which needs a huge CFG
scale and gives over-saturated, over-smoothed assets. VSD treats the rendered images as a distribution
and follows the difference of two scores at the noisy render x_t = sqrt(abar) x + sqrt(1 - abar) eps:

    grad_x = w(t) (eps_pretrained(x_t; y, t) - eps_phi(x_t; y, t, c))

- eps_pretrained: the frozen prior with classifier-free guidance (CFG 7.5), the score of the data;
- eps_phi: the score of the renders, learnt while they change: a LoRA on a UNet whose time embedding also
  receives the camera c (c2w flattened to 16 numbers, through a timestep-embedding-style MLP, as the
  UNet's class embedding), trained every step with the ordinary diffusion loss on the detached render,
  t ~ U[0, T), with the camera zeroed with probability `guidance.vsd.camera_dropout`, by its own AdamW.

SDS is the case eps_phi = eps (the drawn noise). Written as an MSE to a detached target (threed.guidance.sds),
the particle score simply replaces the noise.

Memory: when the LoRA's base is the pretrained model itself (`guidance.vsd.lora_model` empty), ONE UNet
serves both scores: the pretrained pass runs with the adapters disabled and without the class embedding,
the particle pass with both. A different base (the paper's v-prediction SD 2.1) loads a second UNet; a
v-prediction output is converted to eps for either score.

With the oracle prior (threed/guidance/oracle.py) the pretrained score is the closed-form optimal
denoiser of a reference mesh's renders, in pixel space, and the particle score a small camera-conditioned
UNet on the render (diffusers' UNet2DModel, random init), trained the same way: the whole algorithm runs,
and converges to a known shape, without weights.

Several particles sharing one LoRA (the paper's n_particles) are not implemented: the trainer optimises
one field.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threed.cameras import Cameras
from threed.errors import UserError, first_line
from threed.guidance import sds

if TYPE_CHECKING:
    from threed.config import Config
    from threed.priors import VSDConfig

CAMERA_DIM = 16  # c2w flattened
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection, as the paper's LoRA
SD_ONLY = ("lora_model", "lora_rank", "lora_alpha")
ORACLE_ONLY = ("denoiser_channels",)


# -- the math shared by both priors ------------------------------------------------------------------

def camera_condition(cameras: Cameras) -> Tensor:
    """(B, 16): each camera's camera-to-world matrix, flattened (the paper's "extrinsics" condition)."""
    return cameras.c2w.reshape(len(cameras), CAMERA_DIM).float()


def drop_cameras(condition: Tensor, probability: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Zero each row with `probability` (one draw per image from `generator`), so the particle score also
    learns the camera-free score, as classifier-free guidance trains its unconditional model.
    Returns (condition, dropped mask (B,) bool)."""
    dropped = torch.rand(condition.shape[0], generator=generator) < probability
    keep = (~dropped).to(condition.device, condition.dtype).view(-1, *([1] * (condition.dim() - 1)))
    return condition * keep, dropped


def add_noise(x: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """x_t = sqrt(abar) x + sqrt(1 - abar) eps, `abar` (B,) broadcast over x's other dimensions."""
    a = abar.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return a.sqrt() * x + (1.0 - a).sqrt() * noise


def eps_from_v(v: Tensor, x_t: Tensor, abar: Tensor) -> Tensor:
    """A v-prediction as a noise prediction: eps = sqrt(abar) v + sqrt(1 - abar) x_t
    (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022)."""
    a = abar.to(v.dtype).view(-1, *([1] * (v.dim() - 1)))
    return a.sqrt() * v + (1.0 - a).sqrt() * x_t.to(v.dtype)


def v_target(x0: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """The v-prediction training target sqrt(abar) eps - sqrt(1 - abar) x0."""
    a = abar.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * noise - (1.0 - a).sqrt() * x0


def as_eps(prediction: Tensor, x_t: Tensor, abar: Tensor, prediction_type: str) -> Tensor:
    return eps_from_v(prediction, x_t, abar) if prediction_type == "v_prediction" else prediction


def training_target(x0: Tensor, noise: Tensor, abar: Tensor, prediction_type: str) -> Tensor:
    return v_target(x0, noise, abar) if prediction_type == "v_prediction" else noise


def camera_embedding(dim: int) -> nn.Module:
    """c (16) -> Linear -> SiLU -> Linear -> (dim), diffusers' TimestepEmbedding as the UNet's class embedding
    (the UNet adds it to its time embedding). The last layer starts at zero, so at step 0 the particle score
    is its base model and the camera's influence is learnt from there."""
    from diffusers.models.embeddings import TimestepEmbedding

    module = TimestepEmbedding(CAMERA_DIM, dim)
    nn.init.zeros_(module.linear_2.weight)
    nn.init.zeros_(module.linear_2.bias)
    return module


def check_prior_keys(vsd: VSDConfig, prior: str) -> None:
    """guidance.vsd keys that only one prior reads must not be set for the other (they would be ignored)."""
    default = type(vsd)()
    unused = ORACLE_ONLY if prior == "stable_diffusion" else SD_ONLY
    changed = [k for k in unused if getattr(vsd, k) != getattr(default, k)]
    if changed:
        other = "oracle" if prior == "stable_diffusion" else "stable_diffusion"
        keys = ", ".join(f"guidance.vsd.{k}" for k in changed)
        raise UserError(f"{keys} set, but only the {other} prior reads it and this run's prior is {prior}: "
                        f"drop the setting or pass --guidance {other}")


def build_vsd(cfg: Config, device: str) -> Any:
    """The VSD guidance for cfg's prior (models are loaded here): the builder of the prolificdreamer method's
    own section, guidance.vsd, in the prior registry (threed/priors.py)."""
    prior = cfg.guidance.type
    if prior not in ("stable_diffusion", "oracle"):
        raise UserError(f"variational score distillation takes the stable_diffusion or oracle prior, not {prior}: "
                        f"pass --guidance stable_diffusion")
    check_prior_keys(cfg.guidance.vsd, prior)
    return StableDiffusionVSD(cfg, device) if prior == "stable_diffusion" else OracleVSD(cfg, device)


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class ParticleScore:
    """What both priors' VSD share: the particle score's trainable parameters, its AdamW with the
    `guidance.vsd.lora_lr` schedule, and checkpointing of those together with the guidance's RNG, so a
    resumed run continues the particle score's training exactly."""

    cfg: Any  # GuidanceConfig
    device: torch.device
    generator: torch.Generator
    alphas: Tensor  # abar_t, t = 0..T-1, on the device

    def _setup_optimizer(self, params: dict[str, nn.Parameter]) -> None:
        self.trainable = params
        # threestudio's AdamW settings for the guidance parameters (betas 0.9, 0.99; default weight decay;
        # eps from the config, threestudio's 1e-15 in the prolificdreamer preset)
        self.optimizer = torch.optim.AdamW(list(params.values()), lr=self.cfg.vsd.lora_lr(0), betas=(0.9, 0.99),
                                           eps=self.cfg.vsd.lora_eps)
        self.timings: dict[str, float] = {}

    def _training_draws(self, x: Tensor, camera: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The particle score's training batch from the guidance's stream: each render `lora_samples` times,
        with t ~ U[lora_t) * T (all of [0, T) by default, unlike the update's annealed range), the noise, and
        the camera condition with dropout. Returns (x, t, noise, camera)."""
        repeats = self.cfg.vsd.lora_samples
        x, camera = x.repeat(repeats, *([1] * (x.dim() - 1))), camera.repeat(repeats, 1)
        n = int(self.alphas.shape[0])
        lo, hi = self.cfg.vsd.lora_t
        t = torch.randint(int(lo * n), max(int(hi * n), int(lo * n) + 1), (x.shape[0],), generator=self.generator)
        noise = torch.randn(x.shape, generator=self.generator).to(x.device, x.dtype)
        camera, _ = drop_cameras(camera, self.cfg.vsd.camera_dropout, self.generator)
        return x, t.to(self.device), noise, camera

    def _train_step(self, loss: Tensor, step: int) -> None:
        """One AdamW step of the particle score on its own loss (its graph is separate from the field's)."""
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return  # the trainer stops the run on the field's loss; never spoil the particle score
        loss.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.vsd.lora_lr(step)
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {
            "params": {name: p.detach().clone() for name, p in self.trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        params = state["params"]
        missing = sorted(set(self.trainable) ^ set(params))
        if missing:
            raise UserError(f"the checkpoint's particle score does not match this configuration "
                            f"(e.g. {missing[0]}): resume with the run's own guidance.vsd settings")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(params[name].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


# -- Stable Diffusion --------------------------------------------------------------------------------

class StableDiffusionVSD(ParticleScore):
    """VSD with Stable Diffusion as the data score and a camera-conditioned LoRA (peft) as the particle score."""

    def __init__(self, cfg: Config, device: str) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        from threed.guidance.hub import model_identity, resolve_pretrained
        from threed.guidance.stable_diffusion import StableDiffusionGuidance
        from threed.prompts import PromptEmbeddings

        self.cfg = cfg.guidance
        vsd = cfg.guidance.vsd
        self.sd = sd = StableDiffusionGuidance(cfg, device)
        self.device, self.dtype = sd.device, sd.dtype
        # The particle score sees the plain prompt (no view suffix): the camera is its own condition.
        self.plain_prompts = PromptEmbeddings(cfg.prompt, cfg.negative_prompt, sd.encode_text, model_identity(sd.path),
                                              cfg.camera, view_dependent=False, device=self.device, dtype=self.dtype)
        sd.text_encoder = None  # every prompt is embedded; free its memory (about 0.7 GB for SD 2.x in fp16)

        lora_path = resolve_pretrained(vsd.lora_model, "LoRA base", required=("unet", "scheduler"),
                                       local_hint="guidance.vsd.lora_model=/path/to/a/diffusers/folder") \
            if vsd.lora_model else sd.path
        self.shared = lora_path == sd.path
        if self.shared:
            self.unet, self.lora_scheduler = sd.unet, sd.scheduler
        else:
            try:
                self.unet = UNet2DConditionModel.from_pretrained(lora_path, subfolder="unet", torch_dtype=self.dtype)
                self.lora_scheduler = DDPMScheduler.from_pretrained(lora_path, subfolder="scheduler")
            except (OSError, ValueError, RuntimeError) as e:
                raise UserError(f"cannot load the LoRA base from '{lora_path}': {first_line(e)}; pass a diffusers "
                                f"folder or hub id to guidance.vsd.lora_model") from None
            self.unet.requires_grad_(False)
            self.unet.eval()
            self.unet.to(self.device)
            self._check_compatible(vsd.lora_model)
        self.lora_prediction_type = self.lora_scheduler.config.prediction_type
        if self.lora_prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"the LoRA base '{vsd.lora_model}' predicts '{self.lora_prediction_type}'; use a model "
                            f"that predicts epsilon or v")
        self.alphas = sd.alphas_cumprod  # the same schedule for both models (checked)

        # Adapters and camera MLP from their own seeded stream: the run's random state stays untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.unet.add_adapter(LoraConfig(r=vsd.lora_rank, lora_alpha=vsd.lora_alpha,
                                             target_modules=list(LORA_TARGETS), init_lora_weights=True))
            embed_dim = self.unet.time_embedding.linear_2.out_features
            self.camera_embedding = camera_embedding(embed_dim).to(self.device)
        lora = {f"unet.{n}": p for n, p in self.unet.named_parameters() if "lora_" in n}
        for p in lora.values():
            p.data = p.data.float()  # trained in fp32 over an fp16 base (peft casts activations)
        self._lora_layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        self._particle_depth = 0
        if self.shared:
            self._set_particle_mode(False)
        else:
            self.unet.class_embedding = self.camera_embedding
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self._setup_optimizer({**lora, **{f"camera_embedding.{n}": p
                                          for n, p in self.camera_embedding.named_parameters()}})

    def _check_compatible(self, name: str) -> None:
        """The LoRA base shares the main model's text embeddings, latents and noise schedule (as SD 2.1 and
        2.1-base do); anything else would score a different space."""
        main, other = self.sd.unet.config, self.unet.config
        if (other.in_channels, other.cross_attention_dim) != (main.in_channels, main.cross_attention_dim):
            raise UserError(f"the LoRA base '{name}' takes {other.in_channels}-channel latents and "
                            f"{other.cross_attention_dim}-wide text embeddings, the main model {main.in_channels} and "
                            f"{main.cross_attention_dim}: pass a LoRA base of the same family (e.g. SD 2.1 with 2.1-base)")
        theirs = self.lora_scheduler.alphas_cumprod.to(self.device, torch.float32)
        if theirs.shape != self.sd.alphas_cumprod.shape or not torch.allclose(theirs, self.sd.alphas_cumprod, atol=1e-6):
            raise UserError(f"the LoRA base '{name}' has another noise schedule than the main model: pass a LoRA "
                            f"base with the same scheduler")

    def _set_particle_mode(self, on: bool) -> None:
        """The shared UNet as the particle score (adapters on, camera class embedding) or as the pretrained
        model (neither)."""
        for layer in self._lora_layers:
            layer.enable_adapters(on)
        self.unet.class_embedding = self.camera_embedding if on else None

    @contextmanager
    def particle_mode(self) -> Iterator[Any]:
        """The UNet as the particle score for the block. The LoRA's training backward must run inside it:
        peft marks disabled adapters as not requiring grad, and autograd drops gradients for such leaves."""
        if not self.shared or self._particle_depth:
            self._particle_depth += 1
            try:
                yield self.unet
            finally:
                self._particle_depth -= 1
            return
        self._particle_depth = 1
        self._set_particle_mode(True)
        try:
            yield self.unet
        finally:
            self._set_particle_mode(False)
            self._particle_depth = 0

    def particle_prediction(self, latents_noisy: Tensor, t: Tensor, text: Tensor, camera: Tensor) -> Tensor:
        """The particle UNet's raw output (eps or v, as its base predicts), float32."""
        with self.particle_mode() as unet:
            return unet(latents_noisy.to(self.dtype), t, encoder_hidden_states=text, class_labels=camera).sample.float()

    def pretrained_eps(self, latents_noisy: Tensor, t: Tensor, cameras: Cameras) -> Tensor:
        """Guided noise prediction of the frozen model (view-dependent prompts, or Perp-Neg where it is on),
        without adapters or camera."""
        return self.sd.guided_eps(latents_noisy, t, cameras)

    def plain_text(self, batch: int) -> Tensor:
        text = self.plain_prompts.cond["front"]
        return text.expand(batch, *text.shape)

    def __call__(self, rgb: Tensor, cameras: Cameras, step: int, **_: object) -> dict[str, Tensor | float]:
        if self.sd.cudagraphs:
            from threed.guidance import compile as compiling

            compiling.new_iteration()
        batch = rgb.shape[0]
        t0 = sync(self.device)
        latents = self.sd.encode_images(rgb).float()
        camera = camera_condition(cameras).to(self.device)
        text = self.plain_text(batch)
        t = sds.sample_timesteps(self.cfg, step, batch, self.sd.num_train_timesteps, self.generator).to(self.device)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        latents_noisy = add_noise(latents.detach(), noise, self.alphas[t])
        t1 = sync(self.device)
        eps_pretrained = self.pretrained_eps(latents_noisy, t, cameras)
        t2 = sync(self.device)
        with torch.no_grad():
            eps_particle = as_eps(self.particle_prediction(latents_noisy, t, text, camera), latents_noisy,
                                  self.alphas[t], self.lora_prediction_type)
        w = sds.weight(self.cfg.weighting, self.alphas[t])
        loss, grad = sds.sds_loss(latents, eps_pretrained, eps_particle, w, self.cfg.grad_clip)
        t3 = sync(self.device)
        particle_loss = self.train_particle_score(latents.detach(), text, camera, step)
        t4 = sync(self.device)
        self.timings = {"encode": t1 - t0, "pretrained": t2 - t1, "particle": t3 - t2, "particle_train": t4 - t3}
        return {"loss": loss, "t": float(t.float().mean()) / self.sd.num_train_timesteps,
                "grad_norm": float(grad.norm()), "particle_loss": particle_loss}

    def train_particle_score(self, latents: Tensor, text: Tensor, camera: Tensor, step: int) -> float:
        """One step of the LoRA's diffusion loss on the detached latents; returns the loss."""
        latents, t, noise, camera = self._training_draws(latents, camera)
        abar = self.alphas[t]
        text = text.repeat(self.cfg.vsd.lora_samples, 1, 1)
        with self.particle_mode():
            prediction = self.particle_prediction(add_noise(latents, noise, abar), t, text, camera)
            loss = F.mse_loss(prediction, training_target(latents, noise, abar, self.lora_prediction_type))
            self._train_step(loss, step)
        return float(loss.detach())


# -- the oracle prior --------------------------------------------------------------------------------

class OracleVSD(ParticleScore):
    """VSD with the oracle prior (the optimal denoiser of a reference mesh's renders) as the data score and a
    small camera-conditioned pixel UNet as the particle score.

    The denoiser predicts v (converted to eps like a v-prediction SD model): from random weights, v makes the
    trivial answers right at both ends of t (eps ~ x_t when the noise dominates, x0 ~ x_t when it is weak),
    so the particle score is usable after a few steps instead of hundreds.
    """

    prediction_type = "v_prediction"

    def __init__(self, cfg: Config, device: str) -> None:
        from diffusers import UNet2DModel

        from threed.guidance.oracle import OracleGuidance

        self.cfg = cfg.guidance
        self.oracle = OracleGuidance(cfg, device)
        self.device = self.oracle.device
        self.alphas = self.oracle.alphas
        self.generator = self.oracle.generator  # jittered views, t, noise and camera dropout: one stream
        channels = tuple(cfg.guidance.vsd.denoiser_channels)
        factor = 2 ** (len(channels) - 1)
        for w, h in {cfg.render.size(0), cfg.render.size(max(cfg.render.hires_step, 0))}:
            if w % factor or h % factor:
                raise UserError(f"the render size {w}x{h} is not a multiple of {factor}, which the pixel denoiser's "
                                f"{len(channels)} levels (guidance.vsd.denoiser_channels) need: change one of them")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.denoiser = UNet2DModel(
                in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
                down_block_types=("DownBlock2D",) * len(channels), up_block_types=("UpBlock2D",) * len(channels),
                norm_num_groups=8, add_attention=True, attention_head_dim=8)
            nn.init.zeros_(self.denoiser.conv_out.weight)  # v = 0 at first: eps = sqrt(1 - abar) x_t
            nn.init.zeros_(self.denoiser.conv_out.bias)
            self.denoiser.class_embedding = camera_embedding(self.denoiser.time_embedding.linear_2.out_features)
        self.denoiser.to(self.device).train()
        self._setup_optimizer(dict(self.denoiser.named_parameters()))

    def particle_prediction(self, x_t: Tensor, t: Tensor, camera: Tensor) -> Tensor:
        """v for images x_t (B, H, W, 3), as (B, H, W, 3)."""
        out = self.denoiser(x_t.permute(0, 3, 1, 2), t.to(self.device), class_labels=camera).sample
        return out.permute(0, 2, 3, 1)

    def __call__(self, rgb: Tensor, cameras: Cameras, step: int, shading: str, background: Tensor,
                 **_: object) -> dict[str, Tensor | float]:
        from threed.guidance.oracle import oracle_eps

        b = rgb.shape[0]
        if rgb.shape[1:3] != (cameras.height, cameras.width):
            raise ValueError(f"render {tuple(rgb.shape[1:3])} does not match the cameras' "
                             f"{(cameras.height, cameras.width)}")
        t0 = sync(self.device)
        background = background.detach().to(self.device)
        refs = torch.stack([self.oracle.render_reference(c, shading, background)
                            for c in self.oracle.reference_cameras(cameras)], dim=1).to(rgb.dtype)
        x = 2.0 * rgb - 1.0
        camera = camera_condition(cameras).to(self.device)
        t = sds.sample_timesteps(self.cfg, step, b, self.alphas.shape[0], self.generator).to(self.device)
        abar = self.alphas[t]
        noise = torch.randn(rgb.shape, generator=self.generator).to(rgb.device, rgb.dtype)
        t1 = sync(self.device)
        with torch.no_grad():
            eps_pretrained, weights = oracle_eps(x.detach(), 2.0 * refs - 1.0, abar, noise)
        t2 = sync(self.device)
        with torch.no_grad():
            x_t = add_noise(x.detach(), noise, abar)
            eps_particle = as_eps(self.particle_prediction(x_t, t, camera), x_t, abar, self.prediction_type)
        loss, grad = sds.sds_loss(x, eps_pretrained, eps_particle, sds.weight(self.cfg.weighting, abar),
                                  self.cfg.grad_clip)
        t3 = sync(self.device)
        particle_loss = self.train_particle_score(x.detach(), camera, step)
        t4 = sync(self.device)
        self.timings = {"encode": t1 - t0, "pretrained": t2 - t1, "particle": t3 - t2, "particle_train": t4 - t3}
        entropy = -(weights * weights.clamp_min(1e-30).log()).sum(1).mean()
        return {"loss": loss, "t": float(t.float().mean()) / self.alphas.shape[0],
                "grad_norm": float(grad.flatten(1).norm(dim=1).mean()), "particle_loss": particle_loss,
                "posterior_entropy": float(entropy)}

    def train_particle_score(self, x: Tensor, camera: Tensor, step: int) -> float:
        """One step of the denoiser's diffusion loss (v target) on the detached render; returns the loss."""
        x, t, noise, camera = self._training_draws(x, camera)
        abar = self.alphas[t]
        prediction = self.particle_prediction(add_noise(x, noise, abar), t, camera)
        loss = F.mse_loss(prediction, training_target(x, noise, abar, self.prediction_type))
        self._train_step(loss, step)
        return float(loss.detach())
