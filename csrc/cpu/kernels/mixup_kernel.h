// Raw-pointer interface of the CPU mixup blend kernel, compiled once per ISA.
#pragma once

#include "common/mixup_args.h"
#include "cpu/isa.h"

FT_ISA_DECLARE(void, mixup_blend_kernel, (const ::fastcore_train::BlendArgs& a))
