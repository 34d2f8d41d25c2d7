"""WGSL kernel templates, one per kernel family (rendered by pyengine.kernels)."""
