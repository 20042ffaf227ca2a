"""`phema demo`: a toy diffusion model on a tree-shaped 2-D mixture where EMA length matters."""
