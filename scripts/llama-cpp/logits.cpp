// Runs llama.cpp on one token sequence and writes the logits of every position, as the
// reference fixture's `llamacpp_top5_forced` was made: one batch, all logits, flash attention
// off, an f16 KV cache (llama-cpp-python's defaults).
//
// usage: logits MODEL.gguf IDS.txt OUT.bin [DUMP_DIR]
//   IDS.txt: token ids, whitespace-separated. OUT.bin: n_tokens x n_vocab float32.
//   With HERD_ONE_TOKEN_AT_A_TIME=1 in the environment, the tokens are decoded one per call, as
//   llama.cpp decodes a generated token: its matmuls then take their one-row paths (some K-quant
//   kernels sum in another order for a batch of rows).
//   DUMP_DIR: also write every f32/f16 tensor of the graph there as NAME.bin (a header of 9
//   int64: ggml type, ne[4], nb[4]; then the bytes), to compare herd's steps with llama.cpp's.
#include "ggml.h"
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

static std::string dump_dir;
static std::map<std::string, int> seen;

static bool dump(struct ggml_tensor * t, bool ask, void *) {
    if (ask || (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16)) {
        return true;
    }
    std::string name = t->name;
    for (auto & c : name) {
        if (c == ' ' || c == '/' || c == '(' || c == ')') c = '_';
    }
    // A name can come back (a tensor renamed after each op): number the later ones.
    if (int k = seen[name]++) name += "#" + std::to_string(k);
    FILE * f = fopen((dump_dir + "/" + name + ".bin").c_str(), "wb");
    if (!f) return false;
    int64_t hdr[9] = { (int64_t) t->type, t->ne[0], t->ne[1], t->ne[2], t->ne[3],
                       (int64_t) t->nb[0], (int64_t) t->nb[1], (int64_t) t->nb[2], (int64_t) t->nb[3] };
    fwrite(hdr, sizeof hdr, 1, f);
    fwrite(t->data, 1, ggml_nbytes(t), f);
    fclose(f);
    return true;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf IDS.txt OUT.bin [DUMP_DIR]\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> toks;
    {
        std::ifstream in(argv[2]);
        for (int x; in >> x;) toks.push_back(x);
    }
    if (toks.empty() || toks.size() > 512) {
        fprintf(stderr, "%s: need 1 to 512 token ids\n", argv[2]);
        return 2;
    }
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        fprintf(stderr, "%s: cannot load\n", argv[1]);
        return 1;
    }
    auto cp = llama_context_default_params();
    cp.n_ctx = 2048;
    cp.n_batch = cp.n_ubatch = 512;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (argc > 4) {
        dump_dir = argv[4];
        cp.cb_eval = dump;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    const char * one = getenv("HERD_ONE_TOKEN_AT_A_TIME");
    const bool single = one && one[0] == '1';
    std::vector<float> out;
    llama_batch b = llama_batch_init(toks.size(), 0, 1);
    for (size_t start = 0; start < toks.size();) {
        const size_t n = single ? 1 : toks.size();
        for (size_t i = 0; i < n; i++) {
            b.token[i] = toks[start + i];
            b.pos[i] = start + i;
            b.n_seq_id[i] = 1;
            b.seq_id[i][0] = 0;
            b.logits[i] = 1;
        }
        b.n_tokens = n;
        if (llama_decode(ctx, b)) {
            fprintf(stderr, "llama_decode failed\n");
            return 1;
        }
        const float * l = llama_get_logits(ctx);
        out.insert(out.end(), l, l + (size_t) n_vocab * n);
        start += n;
    }
    FILE * f = fopen(argv[3], "wb");
    if (!f) return 1;
    fwrite(out.data(), sizeof(float), out.size(), f);
    fclose(f);
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
