// Raw-pointer interface of the CPU fused uint8 normalize + mixup/cutmix kernel, compiled once
// per ISA.
#pragma once

#include "common/normalize_mixup_args.h"
#include "cpu/isa.h"

FT_ISA_DECLARE(void, normalize_mixup_kernel, (const ::fastcore_train::NormMixArgs& a))
