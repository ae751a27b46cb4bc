"""Explanation maps for any model: Grad-CAM, occlusion, and their scores against phantom masks."""
