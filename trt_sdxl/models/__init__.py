"""Networks for the SDXL components: unet, (later) clip text encoders and vae."""
