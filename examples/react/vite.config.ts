import { defineConfig } from 'vite'

import { tokensvcBackend } from './server/backend'

// No @vitejs/plugin-react: esbuild's automatic JSX runtime is all this example needs (and installs everywhere).
export default defineConfig({
  esbuild: { jsx: 'automatic' },
  plugins: [tokensvcBackend()],
  // 127.0.0.1, not localhost: the page and tokensvc must be on the same *site* for the SameSite=Lax session
  // cookie, and TOKENSVC_CORS_ORIGINS / TOKENSVC_REDIRECT_ALLOWLIST name this exact origin.
  server: { host: '127.0.0.1', port: 5173, strictPort: true },
  preview: { host: '127.0.0.1', port: 4173, strictPort: true },
})
