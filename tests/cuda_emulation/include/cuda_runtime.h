// Stands in for the CUDA runtime header in the emulated build (see ../emulator.h).
#pragma once
#include "../emulator.h"
