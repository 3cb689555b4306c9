"""NanoFlow's intra-device parallelism: the model as operations (`ops`), plans (`plan`), executors
(`executor`) on execution units (`cpu_units`, `cuda_units`) and step timelines (`trace`)."""
