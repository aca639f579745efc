// The benchmark anchor: SPEC §2 as a plain scalar C loop, compiled with gcc -O3 by benchmarks/advantage.py.
void puff_advantage(const float* v, const float* r, const float* d, const float* w, float* a,
                    int S, int H, float gamma, float lambda, float rho_clip, float c_clip) {
  for (int s = 0; s < S; s++) {
    const float* vs = v + s*H; const float* rs = r + s*H; const float* ds = d + s*H; const float* ws = w + s*H;
    float* as = a + s*H;
    float last = 0.0f; as[H-1] = 0.0f;
    for (int t = H-2; t >= 0; t--) {
      float nnt = 1.0f - ds[t+1];
      float rho = ws[t] < rho_clip ? ws[t] : rho_clip;
      float c = ws[t] < c_clip ? ws[t] : c_clip;
      float delta = rho * (rs[t+1] + gamma*vs[t+1]*nnt - vs[t]);
      last = delta + gamma*lambda*c*nnt*last;
      as[t] = last;
    }
  }
}
