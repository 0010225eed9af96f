"""The built-in dense heads; each module registers its heads with :func:`vitkit.dense.register_head`."""
