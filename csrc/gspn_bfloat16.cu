// Kernels for __nv_bfloat16 inputs (one file per dtype so that ninja compiles them in parallel).
#include "gspn_launch.cuh"

namespace gspn {
GSPN_INSTANTIATE(__nv_bfloat16)
}  // namespace gspn
