"""Developer tools, apart from the ops: the ahead-of-time compile check (`compile_check`), launch recording
and counting (`kernel_launches`) and the README block writer they share (`files`). Nothing in the ops imports
this package; it may import anything in gift_kernels."""
