"""A denoiser small enough for unit tests, built from the U-Net's own SpatialTransformer.

It has the U-Net's interface ([latent, timestep_embedding, context] -> noise) and two attention
blocks, so LoRA discovery, the trainer, checkpoints and resume run on it in seconds.
"""

import keras
import numpy as np

CONTEXT = (77, 768)


def tiny_unet(latent: int | tuple[int, int] = 8, channels: int = 32,
              name: str = "tiny_unet") -> keras.Model:
    """``latent``: a square's side, or (height, width) in latent pixels."""
    from fashion_sd.sd.unet import SpatialTransformer

    h, w = latent if isinstance(latent, tuple) else (latent, latent)
    latent_in = keras.Input((h, w, 4), name="latent")
    t_in = keras.Input((320,), name="timestep_embedding")
    c_in = keras.Input(CONTEXT, name="context")
    t = keras.layers.Reshape((1, 1, channels))(keras.layers.Dense(channels)(t_in))
    x = keras.layers.Conv2D(channels, 3, padding="same")(latent_in)
    x = keras.layers.Add()([x, t])
    x = SpatialTransformer(2, channels // 2)([x, c_in])
    x = SpatialTransformer(2, channels // 2)([x, c_in])
    out = keras.layers.Conv2D(4, 3, padding="same")(x)
    return keras.Model([latent_in, t_in, c_in], out, name=name)


class FakeClip:
    """Embeds texts by which garment word they hold and images by their mean colour channel,
    so what the judge should conclude is known in closed form."""

    label, random = "fake", False
    WORDS = ["shirt", "shoe", "watch", "person"]

    def embed_texts(self, texts):
        return np.array([[float(w in t) for w in self.WORDS] + [1e-3] for t in texts])

    def embed_images(self, images):
        # red images look like shirts, green like shoes, blue like watches; bright ones are worn
        out = []
        for im in images:
            m = np.asarray(im, float).reshape(-1, 3).mean(0)
            out.append([m[0], m[1], m[2], 300.0 if m.sum() > 400 else 0.0, 1e-3])
        return np.array(out)
