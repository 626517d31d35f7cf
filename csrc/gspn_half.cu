// Kernels for __half inputs (one file per dtype so that ninja compiles them in parallel).
#include "gspn_launch.cuh"

namespace gspn {
GSPN_INSTANTIATE(__half)
}  // namespace gspn
