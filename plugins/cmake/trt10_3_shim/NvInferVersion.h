/*
 * CI shim: pretends the TensorRT headers are 10.3 so that every
 * NV_TENSORRT_MAJOR/MINOR guard in the plugin is compiled on its 10.3 side.
 *
 * The real TensorRT headers include "NvInferVersion.h" with quotes, which finds
 * the copy next to them first; the shim wins only because the plugin includes
 * NvInferVersion.h itself before any other TensorRT header (with this directory
 * ahead in the include path) and the include guard below then keeps the real
 * one out. Only the version macros differ from 10.3; the API declarations still
 * come from the newer headers, so this catches uses of guarded features, not
 * every declaration that 10.3 lacks (see plugins/README.md, Build).
 */
#ifndef NV_INFER_VERSION_H
#define NV_INFER_VERSION_H

#define TRT_MAJOR_ENTERPRISE 10
#define TRT_MINOR_ENTERPRISE 3
#define TRT_PATCH_ENTERPRISE 0
#define TRT_BUILD_ENTERPRISE 26
#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE
#define NV_TENSORRT_MINOR TRT_MINOR_ENTERPRISE
#define NV_TENSORRT_PATCH TRT_PATCH_ENTERPRISE
#define NV_TENSORRT_BUILD TRT_BUILD_ENTERPRISE

#define NV_TENSORRT_LWS_MAJOR 0
#define NV_TENSORRT_LWS_MINOR 0
#define NV_TENSORRT_LWS_PATCH 0

#define NV_TENSORRT_RELEASE_TYPE_EARLY_ACCESS 0
#define NV_TENSORRT_RELEASE_TYPE_RELEASE_CANDIDATE 1
#define NV_TENSORRT_RELEASE_TYPE_GENERAL_AVAILABILITY 2
#define NV_TENSORRT_RELEASE_TYPE NV_TENSORRT_RELEASE_TYPE_GENERAL_AVAILABILITY

#define DIJIANG_TRT_VERSION_SHIM 1

#endif // NV_INFER_VERSION_H
