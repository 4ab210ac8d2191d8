"""UnlearnDiffAtk ("To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy To Generate
Unsafe Images ... For Now", 2024): the defended model as its own diffusion classifier finds prefix tokens that
bring an erased concept back.

    attack = UnlearnDiffAtk(tokens=5, iterations=200)
    prompt = attack.run(pipe, "a red star on a gray background", reference_latents)   # a text prompt
    with stablekit.use(pipe, *defense):
        image = pipe(prompt).images[0]

Implemented after the reference code (OPTML-Group/Diffusion-MU-Attack, ``text_grad`` attacker): ``k`` prefix
tokens after the start token, each a probability vector over the vocabulary (uniform at start); every
iteration samples one token per slot, runs the defended UNet on the reference image's latents noised at a
timestep with fresh noise, and minimises the MSE to the training target (the noise; v for v-prediction models),
conditional branch only; the gradient reaches the probabilities straight through the sampling (clipped to
[-1, 1], as the reference's hardtanh) and Adam (lr 0.01, weight decay 0.1) steps them, followed by a projection
back onto the simplex. Timesteps run in the reference's order: ascending blocks of equal iterations at
``T / n / 2 + j * T / n``. The attack prompt takes each slot's most probable token.

Defaults: 5 prefix tokens (the reference's nudity setting; 3 for objects), lr 0.01, 40 iterations per timestep
block. Deviations: 200 iterations (5 blocks) rather than 50 blocks (2000), to fit a CPU budget; one evaluation, at
the end, rather than after every block with early stopping; the reference latents are the undefended model's
own generation for the prompt (the reference encodes an image the undefended model made, with the VAE).
Only the defense's weight edits and membranes take part in the optimisation (guards that rewrite the prompt
text act when the returned prompt is generated).
"""

from __future__ import annotations

import torch

from ..latents import noise_scheduler, training_target
from ..pipeline import frozen
from ..registry import register
from ..text import Slots


def simplex(p: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of `p` onto the probability simplex."""
    u, _ = p.sort(dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    idx = torch.arange(1, p.shape[-1] + 1, device=p.device, dtype=p.dtype)
    rho = ((u - css / idx) > 0).sum(-1, keepdim=True)
    theta = css.gather(-1, rho - 1) / rho
    return (p - theta).clamp(min=0)


@register("attack")
class UnlearnDiffAtk:
    """``UnlearnDiffAtk(tokens=5, iterations=200, per_timestep=40, lr=0.01, weight_decay=0.1, seed=0)``."""

    name = "unlearndiffatk"

    def __init__(
        self,
        tokens: int = 5,
        iterations: int = 200,
        per_timestep: int = 40,
        lr: float = 0.01,
        weight_decay: float = 0.1,
        seed: int = 0,
    ):
        self.tokens, self.iterations, self.per_timestep = tokens, iterations, per_timestep
        self.lr, self.weight_decay, self.seed = lr, weight_decay, seed

    def timesteps(self, train_steps: int) -> list[int]:
        blocks = max(1, -(-self.iterations // self.per_timestep))
        return [int(train_steps / blocks / 2 + j * train_steps / blocks) for j in range(blocks)]

    def run(self, pipe, prompt: str, reference: torch.Tensor) -> str:
        """An attack prompt: `prompt` with optimised prefix tokens, against `pipe` with its weight edits and
        membranes attached; `reference`: the concept image's latents ``(1, c, h, w)``."""
        g = torch.Generator().manual_seed(self.seed)
        slots, sch = Slots(pipe, self.tokens, prompt), noise_scheduler(pipe)
        table = slots.table.detach()
        ts = self.timesteps(sch.config.num_train_timesteps)
        probs = torch.full((self.tokens, len(table)), 1.0 / len(table), requires_grad=True)
        opt = torch.optim.Adam([probs], lr=self.lr, weight_decay=self.weight_decay)
        x0 = reference.to(pipe.unet.dtype)
        with frozen(pipe.unet, pipe.text_encoder):
            for i in range(self.iterations):
                t = torch.tensor([ts[min(i // self.per_timestep, len(ts) - 1)]])
                pick = torch.multinomial(probs.detach(), 1, generator=g)[:, 0]
                onehot = torch.nn.functional.one_hot(pick, len(table)).to(probs)
                embeds = (onehot + probs - probs.detach()) @ table.to(probs)  # straight through
                noise = torch.randn(x0.shape, generator=g).to(x0)
                pred = pipe.unet(sch.add_noise(x0, noise, t), t, slots.encode(embeds)).sample
                loss = torch.nn.functional.mse_loss(pred.float(), training_target(sch, x0, noise, t).float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                probs.grad.clamp_(-1, 1)
                opt.step()
                with torch.no_grad():
                    probs.copy_(simplex(probs))
        return slots.text(probs.detach().argmax(dim=-1))
