"""The compiled parts: the row-batch and OTLP readers (src/rtmonitor/ingest/_rows.c), the
validator's device table (src/rtmonitor/ingest/_devices.c), the flush's numbering of its
devices (src/rtmonitor/_model.c), the flush's row scatter and the Redis commands' packing
(src/rtmonitor/storage/_pack.c), and the device merge as a Redis module
(src/rtmonitor/storage/_merge.c, loaded by the embedded Redis; built like an extension, but
Redis loads it, not Python).

Everything else about the package is in pyproject.toml. All are optional: without a C
compiler the install still succeeds, row batches use protobuf's parser, OTLP requests the
Python mapping, the validator a dict, the flush's numbering a sort, its packing numpy's
indexing, Redis commands hiredis' packer, and Redis merges devices with the Lua script
instead (the service logs which it uses; `make test` insists on the compiled ones).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rtmonitor._model",
            ["src/rtmonitor/_model.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=vla"],
            optional=True,
        ),
        Extension(
            "rtmonitor.ingest._rows",
            ["src/rtmonitor/ingest/_rows.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=vla"],
            optional=True,
        ),
        Extension(
            "rtmonitor.ingest._devices",
            ["src/rtmonitor/ingest/_devices.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=vla"],
            optional=True,
        ),
        Extension(
            "rtmonitor.storage._pack",
            ["src/rtmonitor/storage/_pack.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=vla"],
            optional=True,
        ),
        Extension(
            "rtmonitor.storage._merge",
            ["src/rtmonitor/storage/_merge.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=vla"],
            libraries=["m"],
            optional=True,
        ),
    ]
)
