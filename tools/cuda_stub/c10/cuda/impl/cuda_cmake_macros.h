// Stand-in for the header a CUDA build of torch generates, so the CUDA glue (.cpp under csrc/cuda) can be
// syntax-checked against a CPU-only torch (tools/cuda_check.sh). Never used in a real build.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
