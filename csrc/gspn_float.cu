// Kernels for float inputs (one file per dtype so that ninja compiles them in parallel).
#include "gspn_launch.cuh"

namespace gspn {
GSPN_INSTANTIATE(float)
}  // namespace gspn
