// The CPU binary cross-entropy kernels, compiled once per ISA; their arguments are described in
// common/row_loss_args.h.
#pragma once

#include "common/row_loss_args.h"
#include "cpu/isa.h"

FT_ISA_DECLARE(void, bce_forward_rows_kernel, (const BceArgs& p))
FT_ISA_DECLARE(void, bce_forward_elementwise_kernel, (const BceArgs& p))
FT_ISA_DECLARE(void, bce_backward_kernel, (const BceArgs& p))
