// `make web` builds the console into web/dist, which the server's HTTP port serves at / (server/web/app.py).
import { defineConfig } from "vite";

export default defineConfig({
  base: "./",
  build: { outDir: "dist", emptyOutDir: true, assetsInlineLimit: 0, chunkSizeWarningLimit: 400 },
});
