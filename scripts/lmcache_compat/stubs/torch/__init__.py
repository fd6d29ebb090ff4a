"""Just enough of torch for LMCache's pure-Python key, config and metadata modules to import.

Dtypes are distinct objects, with torch's aliases (`half is float16`, `float is float32`),
because LMCache maps them to names and wire codes by identity. Anything else a module
touches while importing (decorators, devices, streams) is an inert placeholder; the code
paths the compatibility test runs use none of it.
"""


class dtype:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return "torch." + self.name


float16 = half = dtype("float16")
bfloat16 = dtype("bfloat16")
float32 = float = dtype("float32")
float64 = double = dtype("float64")
uint8 = dtype("uint8")
int8 = dtype("int8")
int16 = dtype("int16")
int32 = dtype("int32")
int64 = long = dtype("int64")
bool = dtype("bool")
float8_e4m3fn = dtype("float8_e4m3fn")
float8_e4m3fnuz = dtype("float8_e4m3fnuz")
float8_e5m2 = dtype("float8_e5m2")
float8_e5m2fnuz = dtype("float8_e5m2fnuz")


class Size(tuple):
    pass


class Tensor:
    pass


class _Inert:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __getattr__(self, name):
        return _Inert()

    def __bool__(self):
        return False

    def __mro_entries__(self, bases):
        return (object,)


def __getattr__(name):
    return _Inert()
