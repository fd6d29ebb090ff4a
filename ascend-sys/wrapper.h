/*
 * ascend-sys: the subset of Huawei CANN that kvrelay calls, written for this crate from
 * the documented signatures in the kvrelay research notes (reference/ascend.md sections
 * 2.2-2.8 and reference/ascend/prototypes.md, which gives the evidence for each one).
 * Not a vendor header: no CANN header text is copied, and a build needs no CANN install.
 *
 * C linkage only. Every function is declared as a function-pointer type plus the symbol
 * name it is resolved by, because the libraries are opened with dlopen at run time and a
 * symbol that an older CANN lacks must be an error at the call, not at load. C enums are
 * declared as int32_t with #defines for their values (every CANN enum here is int-sized).
 *
 * Libraries:
 *   libascendcl.so   ACL runtime (any CANN >= 8.0; aclrtMemcpyBatchAsync from 8.5)
 *   libhcomm.so      HCCL communicators and one-sided calls, CANN >= 8.5
 *   libhccl.so       HCCL ops (Send/Recv); before 8.5 also everything libhcomm.so has
 *   libcann_hixl.so  HIXL client/server C API, CANN >= 9.0 (*Sync calls from 9.1)
 *
 * bindgen turns this file into src/bindings.rs (feature `bindgen`; see build.rs).
 */
#include <stdint.h>
#include <stddef.h>

/* ==== ACL runtime (libascendcl.so) ======================================================= */

typedef int32_t aclError; /* 0 is success */
#define ACL_SUCCESS 0
#define ACL_ERROR_INVALID_PARAM 100000
#define ACL_ERROR_BAD_ALLOC 200000
#define ACL_ERROR_API_NOT_SUPPORT 200001
#define ACL_ERROR_INVALID_DEVICE 200002
#define ACL_ERROR_FEATURE_UNSUPPORTED 200006
#define ACL_ERROR_INTERNAL_ERROR 500000
#define ACL_ERROR_FAILURE 500001
#define ACL_ERROR_RT_PARAM_INVALID 107000
#define ACL_ERROR_RT_INVALID_DEVICEID 107001
#define ACL_ERROR_RT_MEMORY_ALLOCATION 207001
#define ACL_ERROR_RT_NO_DEVICE 207004
#define ACL_ERROR_RT_INTERNAL_ERROR 507000
#define ACL_ERROR_RT_COPY_DATA 507052

typedef void *aclrtStream;

/* aclrtMemcpyKind */
typedef int32_t aclrtMemcpyKind;
#define ACL_MEMCPY_HOST_TO_HOST 0
#define ACL_MEMCPY_HOST_TO_DEVICE 1
#define ACL_MEMCPY_DEVICE_TO_HOST 2
#define ACL_MEMCPY_DEVICE_TO_DEVICE 3

/* aclrtMemMallocPolicy */
typedef int32_t aclrtMemMallocPolicy;
#define ACL_MEM_MALLOC_HUGE_FIRST 0
#define ACL_MEM_MALLOC_HUGE_FIRST_P2P 3

/* aclrtMemLocationType */
typedef int32_t aclrtMemLocationType;
#define ACL_MEM_LOCATION_TYPE_HOST 0
#define ACL_MEM_LOCATION_TYPE_DEVICE 1

/** Where one side of a batch copy is: a device id or host, and which. 8 bytes. */
typedef struct aclrtMemLocation {
    uint32_t id;
    aclrtMemLocationType type;
} aclrtMemLocation;

/** Per-copy attributes of aclrtMemcpyBatch[Async]. 32 bytes. */
typedef struct aclrtMemcpyBatchAttr {
    aclrtMemLocation dstLoc;
    aclrtMemLocation srcLoc;
    uint8_t rsv[16];
} aclrtMemcpyBatchAttr;

/** The output buffer of aclsysGetVersionStr is at least this long. */
#define ASCEND_SYS_VERSION_STR_LEN 128

/** aclError aclInit(const char *configPath): once per process; NULL for no config. */
typedef aclError (*aclInit_fn)(const char *configPath);
#define ACL_SYM_INIT "aclInit"

/** const char *aclGetRecentErrMsg(void): the calling thread's last error text, or NULL. */
typedef const char *(*aclGetRecentErrMsg_fn)(void);
#define ACL_SYM_GET_RECENT_ERR_MSG "aclGetRecentErrMsg"

/** aclError aclrtGetDeviceCount(uint32_t *count): visible devices. */
typedef aclError (*aclrtGetDeviceCount_fn)(uint32_t *count);
#define ACL_SYM_GET_DEVICE_COUNT "aclrtGetDeviceCount"

/** aclError aclrtSetDevice(int32_t deviceId): binds the calling thread to a device. */
typedef aclError (*aclrtSetDevice_fn)(int32_t deviceId);
#define ACL_SYM_SET_DEVICE "aclrtSetDevice"

/** const char *aclrtGetSocName(void): the chip name, e.g. "Ascend910B1", or NULL. */
typedef const char *(*aclrtGetSocName_fn)(void);
#define ACL_SYM_GET_SOC_NAME "aclrtGetSocName"

/** aclError aclrtCreateStream(aclrtStream *stream). */
typedef aclError (*aclrtCreateStream_fn)(aclrtStream *stream);
#define ACL_SYM_CREATE_STREAM "aclrtCreateStream"

/** aclError aclrtDestroyStream(aclrtStream stream). */
typedef aclError (*aclrtDestroyStream_fn)(aclrtStream stream);
#define ACL_SYM_DESTROY_STREAM "aclrtDestroyStream"

/** aclError aclrtSynchronizeStream(aclrtStream stream): waits for all work on it. */
typedef aclError (*aclrtSynchronizeStream_fn)(aclrtStream stream);
#define ACL_SYM_SYNCHRONIZE_STREAM "aclrtSynchronizeStream"

/** aclError aclrtMalloc(void **devPtr, size_t size, aclrtMemMallocPolicy policy). */
typedef aclError (*aclrtMalloc_fn)(void **devPtr, size_t size, aclrtMemMallocPolicy policy);
#define ACL_SYM_MALLOC "aclrtMalloc"

/** aclError aclrtFree(void *devPtr). */
typedef aclError (*aclrtFree_fn)(void *devPtr);
#define ACL_SYM_FREE "aclrtFree"

/** aclError aclrtMallocHost(void **hostPtr, size_t size): page-locked host memory. */
typedef aclError (*aclrtMallocHost_fn)(void **hostPtr, size_t size);
#define ACL_SYM_MALLOC_HOST "aclrtMallocHost"

/** aclError aclrtFreeHost(void *hostPtr). */
typedef aclError (*aclrtFreeHost_fn)(void *hostPtr);
#define ACL_SYM_FREE_HOST "aclrtFreeHost"

/** aclError aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count, kind). */
typedef aclError (*aclrtMemcpy_fn)(void *dst, size_t destMax, const void *src, size_t count,
                                   aclrtMemcpyKind kind);
#define ACL_SYM_MEMCPY "aclrtMemcpy"

/** aclError aclrtMemcpyAsync(dst, destMax, src, count, kind, stream): lands at the stream's
 *  synchronize; host memory must be pinned (aclrtMallocHost), operands 64-byte aligned. */
typedef aclError (*aclrtMemcpyAsync_fn)(void *dst, size_t destMax, const void *src,
                                        size_t count, aclrtMemcpyKind kind,
                                        aclrtStream stream);
#define ACL_SYM_MEMCPY_ASYNC "aclrtMemcpyAsync"

/** aclError aclrtMemcpyBatchAsync(dsts, destMaxs, srcs, sizes, numBatches, attrs,
 *  attrsIndexes, numAttrs, failIndex, stream): one direction (H2D or D2H) per call;
 *  attrsIndexes[0] == 0 and increasing; *failIndex is SIZE_MAX when no one copy failed.
 *  CANN >= 8.5 (experimental in earlier packages that have it). */
typedef aclError (*aclrtMemcpyBatchAsync_fn)(void **dsts, size_t *destMaxs, void **srcs,
                                             size_t *sizes, size_t numBatches,
                                             aclrtMemcpyBatchAttr *attrs,
                                             size_t *attrsIndexes, size_t numAttrs,
                                             size_t *failIndex, aclrtStream stream);
#define ACL_SYM_MEMCPY_BATCH_ASYNC "aclrtMemcpyBatchAsync"

/** aclError aclsysGetVersionStr(char *pkgName, char *versionStr): pkgName "runtime",
 *  "hccl", "driver"...; versionStr has ASCEND_SYS_VERSION_STR_LEN bytes. */
typedef aclError (*aclsysGetVersionStr_fn)(char *pkgName, char *versionStr);
#define ACL_SYM_GET_VERSION_STR "aclsysGetVersionStr"

/** aclError aclsysGetVersionNum(char *pkgName, int32_t *versionNum): major*10^7 +
 *  minor*10^5 + patch*10^3, less 300/200/100 for alpha/beta/rc, plus their number. */
typedef aclError (*aclsysGetVersionNum_fn)(char *pkgName, int32_t *versionNum);
#define ACL_SYM_GET_VERSION_NUM "aclsysGetVersionNum"

/* ==== HCCL (libhcomm.so from CANN 8.5, libhccl.so before) ================================ */

typedef int32_t HcclResult; /* 0 is success */
#define HCCL_SUCCESS 0
typedef void *HcclComm;

/* HcclDataType (the channels move bytes as UINT8) */
typedef int32_t HcclDataType;
#define HCCL_DATA_TYPE_UINT8 7

#define ASCEND_SYS_HCCL_ROOT_INFO_BYTES 4108
/** Opaque bootstrap blob rank 0 sends to the others out of band. 4108 bytes, align 1. */
typedef struct HcclRootInfo {
    char internal[ASCEND_SYS_HCCL_ROOT_INFO_BYTES];
} HcclRootInfo;

/** Communicator config, version 8 (CANN 8.5): 2104 bytes. The first 24 bytes are a header
 *  {size_t size; uint32_t magic; uint32_t version; uint64_t reserved} that the library
 *  reads to know which version it got; the vendor fills it in a header-inline function,
 *  which ascend-sys reimplements (hccl::CommConfigV8::new). */
typedef struct HcclCommConfigV8 {
    char header[24];
    uint32_t hcclBufferSize;
    uint32_t hcclDeterministic;
    char hcclCommName[128];
    char hcclUdi[128];
    uint32_t hcclOpExpansionMode;
    uint32_t hcclRdmaTrafficClass;
    uint32_t hcclRdmaServiceLevel;
    uint32_t hcclWorldRankID;
    uint64_t hcclJobID;
    uint8_t aclGraphZeroCopyEnable;
    int32_t hcclExecTimeOut;
    char hcclAlgo[1600];
    char hcclRetryEnable[50];
    char hcclRetryParams[128];
} HcclCommConfigV8;
#define ASCEND_SYS_HCCL_COMM_CONFIG_MAGIC 0xf0f0f0f0
#define ASCEND_SYS_HCCL_COMM_CONFIG_V8 8
#define ASCEND_SYS_HCCL_NOT_SET 0xffffffff

/** HcclResult HcclGetRootInfo(HcclRootInfo *rootInfo) (libhcomm.so on 8.5+). */
typedef HcclResult (*HcclGetRootInfo_fn)(HcclRootInfo *rootInfo);
#define HCCL_SYM_GET_ROOT_INFO "HcclGetRootInfo"

/** HcclResult HcclCommInitRootInfoConfig(nRanks, rootInfo, rank, config, comm). */
typedef HcclResult (*HcclCommInitRootInfoConfig_fn)(uint32_t nRanks,
                                                    const HcclRootInfo *rootInfo,
                                                    uint32_t rank,
                                                    const HcclCommConfigV8 *config,
                                                    HcclComm *comm);
#define HCCL_SYM_COMM_INIT_ROOT_INFO_CONFIG "HcclCommInitRootInfoConfig"

/** HcclResult HcclCommInitClusterInfoMemConfig(rankTableJson, rank, config, comm): a rank
 *  table as JSON text; exported by libhcomm.so though no public header declares it. */
typedef HcclResult (*HcclCommInitClusterInfoMemConfig_fn)(const char *rankTableJson,
                                                          uint32_t rank,
                                                          HcclCommConfigV8 *config,
                                                          HcclComm *comm);
#define HCCL_SYM_COMM_INIT_CLUSTER_INFO_MEM_CONFIG "HcclCommInitClusterInfoMemConfig"

/** HcclResult HcclCommDestroy(HcclComm comm). */
typedef HcclResult (*HcclCommDestroy_fn)(HcclComm comm);
#define HCCL_SYM_COMM_DESTROY "HcclCommDestroy"

/** const char *HcclGetErrorString(HcclResult code). */
typedef const char *(*HcclGetErrorString_fn)(HcclResult code);
#define HCCL_SYM_GET_ERROR_STRING "HcclGetErrorString"

/** HcclResult HcclSend(buf, count, dataType, destRank, comm, stream) (libhccl.so). */
typedef HcclResult (*HcclSend_fn)(void *sendBuf, uint64_t count, HcclDataType dataType,
                                  uint32_t destRank, HcclComm comm, aclrtStream stream);
#define HCCL_SYM_SEND "HcclSend"

/** HcclResult HcclRecv(buf, count, dataType, srcRank, comm, stream) (libhccl.so). */
typedef HcclResult (*HcclRecv_fn)(void *recvBuf, uint64_t count, HcclDataType dataType,
                                  uint32_t srcRank, HcclComm comm, aclrtStream stream);
#define HCCL_SYM_RECV "HcclRecv"

/* ---- one-sided (libhcomm.so from 8.5, libhccl.so before) -------------------------------- */

/* CommMemType (HcclMemType in 8.5: same values) */
typedef int32_t CommMemType;
#define COMM_MEM_TYPE_DEVICE 0
#define COMM_MEM_TYPE_HOST 1

/** A memory range to register: 24 bytes. */
typedef struct CommMem {
    CommMemType type;
    void *addr;
    uint64_t size;
} CommMem;

/** One one-sided copy: LOCAL address first (HIXL's descriptor is the other way round). */
typedef struct HcclOneSideOpDesc {
    void *localAddr;
    void *remoteAddr;
    uint64_t count;
    HcclDataType dataType;
} HcclOneSideOpDesc;

#define HCCL_TOPO_FULLMESH 0
/** HcclCommPrepare's config: 32 bytes. */
typedef struct HcclPrepareConfig {
    int32_t topoType;
    uint64_t rsvd0;
    uint64_t rsvd1;
    uint64_t rsvd2;
} HcclPrepareConfig;

/** HcclResult HcclRegisterGlobalMem(const CommMem *mem, void **memHandle). */
typedef HcclResult (*HcclRegisterGlobalMem_fn)(const CommMem *mem, void **memHandle);
#define HCCL_SYM_REGISTER_GLOBAL_MEM "HcclRegisterGlobalMem"

/** HcclResult HcclCommBindMem(HcclComm comm, void *memHandle). */
typedef HcclResult (*HcclCommBindMem_fn)(HcclComm comm, void *memHandle);
#define HCCL_SYM_COMM_BIND_MEM "HcclCommBindMem"

/** HcclResult HcclCommPrepare(HcclComm comm, const HcclPrepareConfig *config, int timeout). */
typedef HcclResult (*HcclCommPrepare_fn)(HcclComm comm, const HcclPrepareConfig *config,
                                         int32_t timeoutSeconds);
#define HCCL_SYM_COMM_PREPARE "HcclCommPrepare"

/** HcclResult HcclBatchPut(comm, remoteRank, desc, descNum, stream). */
typedef HcclResult (*HcclBatchPut_fn)(HcclComm comm, uint32_t remoteRank,
                                      HcclOneSideOpDesc *desc, uint32_t descNum,
                                      aclrtStream stream);
#define HCCL_SYM_BATCH_PUT "HcclBatchPut"

/* ==== HIXL client/server C API (libcann_hixl.so, CANN >= 9.1 layout) ===================== */

typedef uint32_t HixlStatus; /* 0 is success */
#define HIXL_SUCCESS 0
#define HIXL_PARAM_INVALID 103900
#define HIXL_TIMEOUT 103901
#define HIXL_FAILED 503900
typedef void *HixlClientHandle;
typedef void *HixlServerHandle;
/* CompleteHandle and MemHandle in hixl_cs.h */
typedef void *HixlCompleteHandle;
typedef void *HixlMemHandle;
/* HixlCompleteStatus */
typedef int32_t HixlCompleteStatus;
#define HIXL_COMPLETE_STATUS_WAITING 0
#define HIXL_COMPLETE_STATUS_COMPLETED 1
#define HIXL_COMPLETE_STATUS_TIMEOUT 2
#define HIXL_COMPLETE_STATUS_FAILED 3

/** An endpoint address: a type tag and 36 bytes of address. 40 bytes. */
typedef struct CommAddr {
    int32_t type;
    uint8_t raws[36];
} CommAddr;

/** Where an endpoint is: a type tag and 60 bytes. 64 bytes. */
typedef struct EndpointLoc {
    int32_t locType;
    uint8_t raws[60];
} EndpointLoc;

/** One endpoint: protocol, address, location, reserved. 160 bytes. */
typedef struct EndpointDesc {
    int32_t protocol;
    CommAddr commAddr;
    EndpointLoc loc;
    uint8_t raws[52];
} EndpointDesc;

/** How a HIXL client reaches its server (9.1 layout; 9.0's differs). 128 bytes. */
typedef struct HixlClientDesc {
    const EndpointDesc *local_endpoint;
    const EndpointDesc *remote_endpoint;
    const char *server_ip;
    uint32_t server_port;
    uint8_t tc;
    uint8_t sl;
    uint8_t reserved[98];
} HixlClientDesc;

/** A HIXL server's endpoints and address (9.1 layout). 128 bytes. */
typedef struct HixlServerDesc {
    const EndpointDesc *endpoint_list;
    const char *server_ip;
    uint32_t server_port;
    uint32_t endpoint_list_num;
    uint8_t reserved[104];
} HixlServerDesc;

/** Client and server config (9.1 layout). 128 bytes each. */
typedef struct HixlConfig {
    const char *global_resource_config;
    uint8_t reserved[120];
} HixlConfig;

/** One HIXL one-sided copy: REMOTE address first. 24 bytes. */
typedef struct HixlOneSideOpDesc {
    void *remote_buf;
    void *local_buf;
    uint64_t len;
} HixlOneSideOpDesc;

/** HixlStatus HixlCSClientCreate(const HixlClientDesc*, const HixlConfig*, handle*). */
typedef HixlStatus (*HixlCSClientCreate_fn)(const HixlClientDesc *desc,
                                            const HixlConfig *config,
                                            HixlClientHandle *handle);
#define HIXL_SYM_CLIENT_CREATE "HixlCSClientCreate"

/** HixlStatus HixlCSClientBatchPutSync(handle, n, descs, timeout_ms): CANN >= 9.1. */
typedef HixlStatus (*HixlCSClientBatchPutSync_fn)(HixlClientHandle handle, uint32_t listNum,
                                                  const HixlOneSideOpDesc *descs,
                                                  uint32_t timeoutMs);
#define HIXL_SYM_CLIENT_BATCH_PUT_SYNC "HixlCSClientBatchPutSync"

/** HixlStatus HixlCSServerCreate(const HixlServerDesc*, const HixlConfig*, handle*). */
typedef HixlStatus (*HixlCSServerCreate_fn)(const HixlServerDesc *desc, const HixlConfig *config,
                                            HixlServerHandle *handle);
#define HIXL_SYM_SERVER_CREATE "HixlCSServerCreate"

/** HixlStatus HixlCSServerRegMem(handle, memTag, const CommMem*, MemHandle*). */
typedef HixlStatus (*HixlCSServerRegMem_fn)(HixlServerHandle handle, const char *memTag,
                                            const CommMem *mem, HixlMemHandle *memHandle);
#define HIXL_SYM_SERVER_REG_MEM "HixlCSServerRegMem"

/** HixlStatus HixlCSServerListen(handle, backlog). */
typedef HixlStatus (*HixlCSServerListen_fn)(HixlServerHandle handle, uint32_t backlog);
#define HIXL_SYM_SERVER_LISTEN "HixlCSServerListen"

/** HixlStatus HixlCSServerDestroy(handle). */
typedef HixlStatus (*HixlCSServerDestroy_fn)(HixlServerHandle handle);
#define HIXL_SYM_SERVER_DESTROY "HixlCSServerDestroy"

/** HixlStatus HixlCSClientConnect(handle, timeout_ms). */
typedef HixlStatus (*HixlCSClientConnect_fn)(HixlClientHandle handle, uint32_t timeoutMs);
#define HIXL_SYM_CLIENT_CONNECT "HixlCSClientConnect"

/** HixlStatus HixlCSClientRegMem(handle, memTag, const CommMem*, MemHandle*). */
typedef HixlStatus (*HixlCSClientRegMem_fn)(HixlClientHandle handle, const char *memTag,
                                            const CommMem *mem, HixlMemHandle *memHandle);
#define HIXL_SYM_CLIENT_REG_MEM "HixlCSClientRegMem"

/** HixlStatus HixlCSClientBatchPutAsync(handle, n, descs, CompleteHandle*). */
typedef HixlStatus (*HixlCSClientBatchPutAsync_fn)(HixlClientHandle handle, uint32_t listNum,
                                                   const HixlOneSideOpDesc *descs,
                                                   HixlCompleteHandle *complete);
#define HIXL_SYM_CLIENT_BATCH_PUT_ASYNC "HixlCSClientBatchPutAsync"

/** HixlStatus HixlCSClientQueryCompleteStatus(handle, CompleteHandle, HixlCompleteStatus*). */
typedef HixlStatus (*HixlCSClientQueryCompleteStatus_fn)(HixlClientHandle handle,
                                                         HixlCompleteHandle complete,
                                                         HixlCompleteStatus *status);
#define HIXL_SYM_CLIENT_QUERY_COMPLETE_STATUS "HixlCSClientQueryCompleteStatus"

/** HixlStatus HixlCSClientDestroy(handle). */
typedef HixlStatus (*HixlCSClientDestroy_fn)(HixlClientHandle handle);
#define HIXL_SYM_CLIENT_DESTROY "HixlCSClientDestroy"
