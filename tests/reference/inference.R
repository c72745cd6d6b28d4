# References for lmmjax's type III anova, Kenward-Roger t-tests and profile
# confidence intervals (tests/test_inference.py), from lmerTest, pbkrtest and lme4.
# Regenerate from the repository root:
#   Rscript tests/reference/inference.R > tests/reference/lmertest_inference.json
suppressMessages({library(lmerTest); library(pbkrtest); library(jsonlite)})
read <- function(name) read.csv(file.path("lmmjax/datasets", paste0(name, ".csv")))
orthodont <- as.data.frame(nlme::Orthodont)
orthodont$Sex <- factor(as.character(orthodont$Sex))  # alphabetical levels, as pandas
orthodont$Subject <- as.character(orthodont$Subject)
cake <- as.data.frame(lme4::cake)
# "<name>-k": without every k-th row (rows 1, 1 + k, ...), an unbalanced version
data_of <- function(name) {
  parts <- strsplit(name, "-")[[1]]
  d <- switch(parts[1], Orthodont = orthodont, cake = cake,
              # sleepstudy with a factor of the day's parity, "0" or "1"
              sleepstudy_parity = transform(read("sleepstudy"), f = factor(Days %% 2)),
              read(parts[1]))
  if (length(parts) == 2) d <- d[-seq(1, nrow(d), by = as.integer(parts[2])), ]
  d
}

anova_cases <- list(
  orthodont = list(data = "Orthodont", f = distance ~ age * Sex + (1 | Subject), reml = TRUE),
  orthodont_ml = list(data = "Orthodont", f = distance ~ age * Sex + (1 | Subject), reml = FALSE),
  cake = list(data = "cake", f = angle ~ recipe * factor(temp) + (1 | recipe:replicate),
              reml = TRUE),
  cake_unbalanced = list(data = "cake-7",
                         f = angle ~ recipe * factor(temp) + (1 | recipe:replicate), reml = TRUE),
  sleep = list(data = "sleepstudy", f = Reaction ~ Days + (Days | Subject), reml = TRUE)
)
anova_out <- lapply(anova_cases, function(cs) {
  m <- lmer(cs$f, data_of(cs$data), REML = cs$reml)
  one <- function(ddf, type = 3) {
    tab <- anova(m, type = type, ddf = ddf)
    list(terms = rownames(tab), sum_sq = tab[["Sum Sq"]], mean_sq = tab[["Mean Sq"]],
         num_df = tab[["NumDF"]], den_df = tab[["DenDF"]], f = tab[["F value"]],
         p = tab[["Pr(>F)"]])
  }
  res <- list(data = cs$data, formula = paste(deparse(cs$f), collapse = ""), reml = cs$reml,
              satterthwaite = one("Satterthwaite"), type1 = one("Satterthwaite", type = 1))
  if (cs$reml) res$kenward_roger <- one("Kenward-Roger")
  res
})

kr_cases <- list(
  sleep = list(data = "sleepstudy", f = Reaction ~ Days + (Days | Subject)),
  sleep_unbalanced = list(data = "sleepstudy-7", f = Reaction ~ Days + (Days | Subject)),
  pastes_unbalanced = list(data = "Pastes-4", f = strength ~ 1 + (1 | batch/cask)),
  penicillin = list(data = "Penicillin", f = diameter ~ 1 + (1 | plate) + (1 | sample)),
  pastes = list(data = "Pastes", f = strength ~ 1 + (1 | batch/cask)),
  orthodont = list(data = "Orthodont", f = distance ~ age * Sex + (1 | Subject)),
  # singular fits: a variance at 0; a variance at 0 and a correlation at 1
  dyestuff2 = list(data = "Dyestuff2", f = Yield ~ 1 + (1 | Batch)),
  sleep_parity = list(data = "sleepstudy_parity",
                      f = Reaction ~ Days + f + (1 | Subject) + (0 + f | Subject))
)
kr_out <- lapply(kr_cases, function(cs) {
  m <- lmer(cs$f, data_of(cs$data), REML = TRUE)
  tab <- coef(summary(m, ddf = "Kenward-Roger"))
  list(data = cs$data, formula = paste(deparse(cs$f), collapse = ""),
       names = rownames(tab), estimate = unname(tab[, "Estimate"]),
       se = unname(tab[, "Std. Error"]), df = unname(tab[, "df"]),
       p = unname(tab[, "Pr(>|t|)"]), vcov_adj = unname(as.matrix(vcovAdj(m))))
})

profile_cases <- list(
  sleep = list(data = "sleepstudy", f = Reaction ~ Days + (Days | Subject), reml = TRUE),
  dyestuff = list(data = "Dyestuff", f = Yield ~ 1 + (1 | Batch), reml = TRUE),
  penicillin = list(data = "Penicillin", f = diameter ~ 1 + (1 | plate) + (1 | sample),
                    reml = TRUE)
)
profile_out <- lapply(profile_cases, function(cs) {
  m <- lme4::lmer(cs$f, data_of(cs$data), REML = cs$reml)
  ci <- suppressMessages(confint(m, method = "profile", level = 0.95, oldNames = FALSE))
  list(data = cs$data, formula = paste(deparse(cs$f), collapse = ""), reml = cs$reml,
       names = rownames(ci), lower = unname(ci[, 1]), upper = unname(ci[, 2]))
})

cat(toJSON(list(lmerTest = as.character(packageVersion("lmerTest")),
                pbkrtest = as.character(packageVersion("pbkrtest")),
                lme4 = as.character(packageVersion("lme4")),
                anova = anova_out, kenward_roger = kr_out, profile = profile_out),
           digits = NA, auto_unbox = TRUE, pretty = TRUE))
