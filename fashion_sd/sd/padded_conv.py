"""The convolution every SD 1.x network is made of: explicit zero padding, then a 'valid' Conv2D.

Explicit, rather than ``padding="same"``, because the VAE encoder pads its stride-2
downsampling asymmetrically (right and bottom only, as the original CompVis code does), which
"same" does not express; the name and the ``padding2d`` / ``conv2d`` parts are KerasCV's, so
weight files written for KerasCV's networks load into ours.
"""

from __future__ import annotations

import keras


class PaddedConv2D(keras.layers.Layer):
    def __init__(self, filters, kernel_size, padding=0, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.padding2d = keras.layers.ZeroPadding2D(padding)
        self.conv2d = keras.layers.Conv2D(filters, kernel_size, strides=strides)

    def call(self, inputs):
        return self.conv2d(self.padding2d(inputs))
