"""lora.init against PEFT's own code: A's distribution on the same shapes, and one AdamW step's
change of a layer's output from the same weights, input and target."""

import keras
import numpy as np
import pytest
from scipy import stats
from tiny import tiny_unet

from fashion_sd.config import LoraConfig, TrainConfig
from fashion_sd.sd import lora
from fashion_sd.sd.attention import use_lora_form
from fashion_sd.training import trainer as tr

# PEFT's init_lora_weights for each of ours (keras has no PEFT counterpart)
PEFT_INIT = {"kaiming": True, "gaussian": "gaussian"}


def keras_lora_dense(fan_in, fan_out, rank, alpha, init, seed=0):
    """A Dense with LoRA enabled exactly as apply_lora does it (initializer, separate branch)."""
    keras.utils.set_random_seed(seed)
    dense = keras.layers.Dense(fan_out)
    dense.build((None, fan_in))
    dense.enable_lora(rank, lora_alpha=alpha, a_initializer=lora.a_initializer(init, rank))
    use_lora_form(dense, "separate")
    return dense


def peft_lora_linear(fan_in, fan_out, rank, alpha, init=True, seed=0):
    import torch
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    torch.manual_seed(seed)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(fan_in, fan_out)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(One(), PeftConfig(r=rank, lora_alpha=alpha, target_modules=["proj"],
                                             lora_dropout=0.0, init_lora_weights=init))
    return model, model.base_model.model.proj


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@pytest.mark.parametrize("fan_in,rank", [(320, 4), (768, 16)])
def test_a_is_drawn_as_peft_draws_it(init, fan_in, rank):
    draws = 20  # layers, for a sample of 20 * fan_in * rank values
    ours = np.concatenate([keras_lora_dense(fan_in, 32, rank, rank, init, seed=s)
                           .lora_kernel_a.numpy().ravel() for s in range(draws)])
    theirs = np.concatenate([peft_lora_linear(fan_in, 32, rank, rank, PEFT_INIT[init], seed=s)[1]
                             .lora_A["default"].weight.detach().numpy().ravel()
                             for s in range(draws)])
    if init == "kaiming":
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
        assert np.abs(ours).max() > 0.99 * bound
        std = 1 / np.sqrt(3 * fan_in)
    else:
        std = 1 / rank
    n = ours.size
    for sample in (ours, theirs):  # each within 5 standard errors of the closed form
        assert abs(sample.std() - std) < 5 * std / np.sqrt(2 * n)
        assert abs(sample.mean()) < 5 * std / np.sqrt(n)
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
    # B starts at zero on both sides
    assert not keras_lora_dense(fan_in, 32, rank, rank, init).lora_kernel_b.numpy().any()


def test_keras_init_is_he_uniform_2_45x_kaimings_spread():
    fan_in, rank = 320, 8
    keras_a = np.concatenate([keras_lora_dense(fan_in, 32, rank, rank, "keras", seed=s)
                              .lora_kernel_a.numpy().ravel() for s in range(20)])
    kaiming = np.concatenate([keras_lora_dense(fan_in, 32, rank, rank, "kaiming", seed=s)
                              .lora_kernel_a.numpy().ravel() for s in range(20)])
    assert np.abs(keras_a).max() <= np.sqrt(6 / fan_in)
    assert keras_a.std() == pytest.approx(np.sqrt(2 / fan_in), rel=0.02)
    assert keras_a.std() / kaiming.std() == pytest.approx(np.sqrt(6), rel=0.03)  # 2.449


def test_apply_lora_uses_lora_init():
    for init, check in (("kaiming", lambda a, n: np.abs(a).max() <= 1 / np.sqrt(n)),
                        ("keras", lambda a, n: np.abs(a).max() > 1 / np.sqrt(n))):
        keras.utils.set_random_seed(0)
        layers = lora.apply_lora(tiny_unet(), LoraConfig(rank=4, alpha=8.0, init=init))
        a = {k: v.lora_kernel_a.numpy() for k, v in layers.items()}
        cross = [x for k, x in a.items() if k.endswith(("attn2.to_k", "attn2.to_v"))]
        assert cross and all(x.shape[0] == 768 for x in cross)
        assert check(np.concatenate([x.ravel() for x in cross]), 768)
    assert LoraConfig().init == "kaiming"


@pytest.mark.parametrize("b_start", ["zero", "random"])
def test_one_adamw_step_changes_the_output_as_peft_does(b_start):
    import torch

    fan_in, fan_out, rank, alpha, lr, wd = 64, 48, 4, 8.0, 1e-3, 1e-2
    dense = keras_lora_dense(fan_in, fan_out, rank, alpha, "kaiming")
    rng = np.random.default_rng(0)
    dense.bias.assign(rng.standard_normal(fan_out).astype("float32") * 0.1)
    if b_start == "random":  # so A gets a gradient too
        dense.lora_kernel_b.assign(rng.standard_normal((rank, fan_out)).astype("float32") * 0.05)
    x = rng.standard_normal((16, fan_in)).astype("float32")
    target = rng.standard_normal((16, fan_out)).astype("float32")
    probe = rng.standard_normal((8, fan_in)).astype("float32")

    model, layer = peft_lora_linear(fan_in, fan_out, rank, alpha)
    assert layer.scaling["default"] == alpha / rank == dense.lora_alpha / dense.lora_rank
    with torch.no_grad():  # our weights into PEFT's (torch stores Linear weights transposed)
        layer.base_layer.weight.copy_(torch.tensor(dense._kernel.numpy().T))
        layer.base_layer.bias.copy_(torch.tensor(dense.bias.numpy()))
        layer.lora_A["default"].weight.copy_(torch.tensor(dense.lora_kernel_a.numpy().T))
        layer.lora_B["default"].weight.copy_(torch.tensor(dense.lora_kernel_b.numpy().T))

    # ours: the trainer's AdamW (make_optimizer) on A and B
    variables = [dense.lora_kernel_a, dense.lora_kernel_b]
    opt = tr.make_optimizer(TrainConfig(learning_rate=lr, weight_decay=wd, grad_clip=None), 100,
                            "float32")
    opt.build(variables)
    before = np.asarray(dense(probe))
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = keras.ops.mean(keras.ops.square(dense(x) - target))
    opt.apply(tape.gradient(loss, variables), variables)
    ours = np.asarray(dense(probe)) - before

    # PEFT's: torch's AdamW, the same hyperparameters. Keras adds epsilon to sqrt(v) before the
    # bias correction sqrt(1 - beta2^t), torch after it: at step 1 Keras' 1e-7 is torch's
    # 1e-7 / sqrt(1 - 0.999).
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2
    topt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-7 / np.sqrt(1 - 0.999),
                             weight_decay=wd)
    tprobe = torch.tensor(probe)
    with torch.no_grad():
        tbefore = model(tprobe).numpy()
    np.testing.assert_allclose(tbefore, before, atol=1e-5)
    tloss = torch.mean((model(torch.tensor(x)) - torch.tensor(target)) ** 2)
    assert float(tloss.detach()) == pytest.approx(float(loss), rel=1e-5)
    tloss.backward()
    topt.step()
    with torch.no_grad():
        theirs = model(tprobe).numpy() - tbefore
    assert np.abs(theirs).max() > 1e-3  # the step moved the output
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
