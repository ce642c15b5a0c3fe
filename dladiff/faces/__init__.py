"""Face detection, alignment and identity encoders (ArcFace-type and dlib)."""
