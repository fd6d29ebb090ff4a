"""LMCache's token database imports AutoTokenizer; the keys are computed from token ids."""


class AutoTokenizer:
    pass
