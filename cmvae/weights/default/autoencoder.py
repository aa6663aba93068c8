"""Lets `diffusers.AutoModel.from_pretrained(this_folder, trust_remote_code=True)` load this model.

The code is the installed cmvae package (pip install cmvae); this file only names its class.
"""

from cmvae.models.autoencoder import CrossModalVAE  # noqa: F401
