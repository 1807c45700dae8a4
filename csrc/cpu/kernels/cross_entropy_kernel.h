// The CPU cross-entropy kernels, compiled once per ISA; their arguments are described in
// common/row_loss_args.h.
#pragma once

#include "common/row_loss_args.h"
#include "cpu/isa.h"

FT_ISA_DECLARE(void, cross_entropy_forward_kernel, (const CrossEntropyArgs& p))
FT_ISA_DECLARE(void, cross_entropy_backward_kernel, (const CrossEntropyArgs& p))
