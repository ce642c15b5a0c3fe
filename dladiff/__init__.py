"""dladiff: dual-layer protection of portraits against diffusion-model customization (DLADiff).

Layer 1 (``dladiff.layer1``) disrupts DreamBooth/LoRA fine-tuning (paper §4.1); layer 2
(``dladiff.layer2``) disrupts zero-shot identity adapters that read faces through ArcFace-type
encoders (paper §4.2). ``dladiff.protect.protect_folder`` runs both on a folder of photos.
"""

__version__ = "0.1.0"
