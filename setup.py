"""The one compiled part: the row-batch and OTLP readers (src/rtmonitor/ingest/_rows.c).

Everything else about the package is in pyproject.toml. The extension is optional: without
a C compiler the install still succeeds, row batches use protobuf's parser and OTLP
requests the Python mapping instead (the service logs which reader it uses; `make test`
insists on the compiled one).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rtmonitor.ingest._rows",
            ["src/rtmonitor/ingest/_rows.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=vla"],
            optional=True,
        )
    ]
)
