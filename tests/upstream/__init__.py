"""Our own small reproductions of the upstream CogVLM / CogVLM2 / CogAgent Hugging Face model classes.

Written from the public interfaces (class names, call signatures, buffers, mask and cache conventions, numerics) so
that ``patch_cogvlm`` is tested against what users actually load — not against our own reference layer. Nothing here
is copied from the upstream files; sizes are tiny.
"""
